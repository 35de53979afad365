"""One generation at a time on one engine thread, a bounded queue in front of it, and cancellation.

The HTTP side runs on an asyncio loop; generation is blocking torch code, so it runs on a thread of
its own and hands each piece of text back to the loop. A request past the queue's bound is refused
at once (``Busy``) rather than left waiting. A job's ``cancel`` is checked after every token, so a
client that goes away stops its generation within one token and frees the engine.

Chat requests go through one ``ChatSession``, the terminal chat's own mechanism for keeping the KV
cache across turns: a request whose messages continue the previous conversation (the same messages
and reply, then a new user turn) feeds only the new turn.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from offload.chat import ChatSession
from offload.engine import Engine
from offload.errors import OffloadError
from offload.generate import Response, SamplingParams
from offload.serve.pace import Pace, Running

# Each hand-over wakes the event loop, whose Python then competes with the engine's for the GIL; on the
# small demo model (about 5 ms a token) waking it per token cost 15 % of decode speed. A model slower
# than this interval per token still streams every token as it comes.
FLUSH_SECONDS = 0.025


class Busy(Exception):
    """The queue is full; ``retry_after`` is a guess, in whole seconds, of when a place frees up."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Piece:
    text: str  # the new text of one step (may be empty)


@dataclass
class Finish:
    finish_reason: str | None  # "stop" or "length"; None when cancelled
    prompt_tokens: int  # the whole prompt, reused part included
    completion_tokens: int
    figures: dict[str, Any]  # the engine's own figures for this answer (the "offload" key)


@dataclass
class Failure:
    status: int
    message: str


@dataclass
class Job:
    """One request's generation: either a chat (``messages``) or a raw completion (``prompt_ids``)."""

    sampling: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    messages: tuple[dict[str, str], ...] = ()
    prompt_ids: list[int] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    generated: int = 0  # tokens generated so far (read by the loop's thread for Retry-After)
    _pending: list[str] = field(default_factory=list)
    _flushed: float = 0.0  # when pieces were last handed over (0: never, so the first goes at once)

    def piece(self, text: str) -> None:
        """Queue ``text`` for the client, handing pieces over at most every FLUSH_SECONDS."""
        self._pending.append(text)
        if time.perf_counter() - self._flushed >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Hand over the pieces held back (before the Finish, say)."""
        if self._pending:
            self.emit(Piece("".join(self._pending)))
            self._pending.clear()
        self._flushed = time.perf_counter()

    def emit(self, event: Piece | Finish | Failure) -> None:
        """Hand ``event`` to the request's coroutine; a loop already closed means nobody waits."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            self.cancel.set()


class Worker:
    """The engine thread and its bounded queue: at most 1 + ``queue_size`` jobs admitted at once.

    ``clock`` times jobs for Retry-After (tests give a fake one).
    """

    def __init__(
        self, engine: Engine, queue_size: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.engine = engine
        self.queue_size = queue_size
        self.session = ChatSession(engine)
        self.served = self.cancelled = self.failed = 0
        self.last_cancelled_tokens: int | None = None  # tokens the last cancelled job had generated
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0
        self._busy = False
        self._current: Job | None = None
        self._started = 0.0  # when the current job began, on ``clock``
        self._waiting: deque[Job] = deque()  # admitted, not yet on the engine: the queue's order
        self._clock = clock
        self._pace = Pace()
        self._thread = threading.Thread(target=self._run, name="offload-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``, or raise Busy when the engine and the queue are both taken."""
        with self._lock:
            if self._admitted >= 1 + self.queue_size:
                raise Busy(self._retry_after())
            self._admitted += 1
            self._waiting.append(job)
            self._jobs.put(job)

    def _retry_after(self) -> int:
        # Under the lock: the running job's progress and what waits behind it.
        current = self._current
        running = None
        if current is not None:
            elapsed = self._clock() - self._started
            running = Running(elapsed, current.generated, current.max_new_tokens)
        return self._pace.retry_after(running, [job.max_new_tokens for job in self._waiting])

    def status(self) -> dict[str, Any]:
        """What /health reports: busy or not, queued jobs and counters."""
        with self._lock:
            waiting = max(0, self._admitted - (1 if self._busy else 0))
            return {
                "busy": self._busy,
                "queued": waiting,
                "queue_size": self.queue_size,
                "served": self.served,
                "cancelled": self.cancelled,
                "failed": self.failed,
                "last_cancelled_tokens": self.last_cancelled_tokens,
                "host_tier": _tier_totals(self.engine),
            }

    def stop(self) -> None:
        """Cancel every admitted job and end the thread after the current token."""
        current = self._current
        if current is not None:
            current.cancel.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.emit(Failure(503, "the server is shutting down"))
        self._jobs.put(None)

    def _run(self) -> None:
        # torch's thread count is per thread under OpenMP: give this one the engine's (--threads).
        torch.set_num_threads(self.engine.settings.threads)
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting.popleft()
                self._busy, self._current, self._started = True, job, self._clock()
            last: Finish | Failure | None = None
            try:
                last = self._execute(job)
            finally:
                with self._lock:
                    self._busy, self._current = False, None
                    self._admitted -= 1
                    # A job cancelled in the queue, or failed before a token, says nothing of the pace.
                    if job.generated:
                        answered = isinstance(last, Finish)
                        self._pace.record(self._clock() - self._started, job.generated, answered=answered)
            # Only now, so that a client reading /health once answered finds the engine free.
            if last is not None:
                job.emit(last)

    def _execute(self, job: Job) -> Finish | Failure | None:
        """Run ``job``, handing its pieces over; its last event, for ``_run`` to hand over (None: cancelled)."""
        if job.cancel.is_set():  # the client left while waiting in the queue
            self.cancelled += 1
            self.last_cancelled_tokens = 0
            return None
        before, tier_before = _counters(self.engine), _tier_counters(self.engine)
        stream, reused = self._stream(job)
        last: Response | None = None
        prompt_tokens = len(job.prompt_ids)
        try:
            for last in stream:
                if job.messages and last is not None and not job.generated:
                    prompt_tokens = len(self.session.tokens)  # the session's ids: reused part and new turn
                job.generated += last.token is not None
                if job.cancel.is_set():
                    break  # checked after every token: a gone client costs at most one more
                job.piece(last.text)
        except OffloadError as err:
            self.failed += 1
            job.flush()
            return Failure(400, str(err))
        except (torch.OutOfMemoryError, MemoryError):
            self.failed += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return Failure(503, "out of memory during generation; try a shorter prompt or max_tokens")
        except Exception as err:  # the server must outlive any one request
            self.failed += 1
            traceback.print_exc(file=sys.stderr)
            return Failure(500, f"internal error during generation: {type(err).__name__}")
        finally:
            stream.close()  # a cancelled chat keeps its partial turn (ChatSession.send's finally)
        if job.cancel.is_set():
            self.cancelled += 1
            self.last_cancelled_tokens = job.generated
            return None
        self.served += 1
        if job.messages:
            reused = prompt_tokens - (last.timings.prompt_tokens if last else 0)
        finish = last.finish_reason if last else "length"
        figures = _figures(last, before, _counters(self.engine), reused)
        figures["host_tier"] = _tier_figures(tier_before, _tier_counters(self.engine))
        job.flush()
        return Finish(finish, prompt_tokens, job.generated, figures)

    def _stream(self, job: Job) -> tuple[Iterator[Response], int]:
        if not job.messages:
            stream = self.engine.stream(
                job.prompt_ids,
                max_new_tokens=job.max_new_tokens,
                sampling=job.sampling,
                stop_strings=job.stop,
                continues_text=True,  # a raw completion: its text continues the prompt's
            )
            return stream, 0
        session = self.session
        system = job.messages[0]["content"] if job.messages[0]["role"] == "system" else None
        earlier = [m for m in job.messages[:-1] if m["role"] != "system"]
        if not (session.tokens and session.system == system and session.messages == earlier):
            # Not the previous conversation going on: start over from these messages (full prefill).
            session.reset()
            session.system, session.messages = system, earlier
        session.sampling, session.max_new_tokens, session.stop_strings = (
            job.sampling,
            job.max_new_tokens,
            job.stop,
        )
        return session.send(job.messages[-1]["content"]), 0


def _counters(engine: Engine) -> Any:
    stats = engine.model.expert_source.stats
    return None if stats is None else stats.total()


def _tier_counters(engine: Engine) -> Any:
    tier = getattr(engine.model.expert_source, "host_tier", None)
    return None if tier is None else tier.stats.total()


def _tier_totals(engine: Engine) -> dict[str, Any] | None:
    """/health's host tier: its budget and setup, and its counters since the server started (no per-layer list)."""
    summary = engine.host_tier_stats()
    return None if summary is None else {k: v for k, v in summary.items() if k != "layers"}


def _tier_figures(before: Any, after: Any) -> dict[str, Any] | None:
    """One answer's share of the host tier's counters (None without a tier, --host-memory)."""
    if before is None or after is None:
        return None
    delta = type(after)(
        **{f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(after)}
    )
    return {
        "hits": delta.hits,
        "misses": delta.misses,
        "hit_rate": delta.hit_rate,
        "disk_bytes_read": delta.disk_bytes_read,
        "disk_wait_seconds": delta.disk_wait_seconds,
    }


def _figures(last: Response | None, before: Any, after: Any, reused: int) -> dict[str, Any]:
    timings = last.timings if last is not None else None
    figures: dict[str, Any] = {
        "prompt_tokens_per_second": timings.prefill_tokens_per_second if timings else 0.0,
        "decode_tokens_per_second": timings.decode_tokens_per_second if timings else 0.0,
        "ttft_seconds": timings.ttft_seconds if timings else 0.0,
        "reused_prompt_tokens": reused,
        "hit_rate": None,
        "prefetch_precision": None,
        "prefetch_recall": None,
        "bytes_moved": 0,
    }
    if before is not None and after is not None:
        # This answer's share of the cache's counters: the totals after, less the totals before.
        delta = type(after)(
            **{f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(after)}
        )
        figures.update(
            hit_rate=delta.hit_rate,
            prefetch_precision=delta.prefetch_precision,
            prefetch_recall=delta.prefetch_recall,
            bytes_moved=delta.bytes_moved,
        )
    return figures
