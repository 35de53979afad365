"""The serve worker on a fake engine and a fake clock: Retry-After and /health, with no timing in the test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from offload.generate import Response, SamplingParams
from offload.serve import worker as worker_module
from offload.serve.pace import Pace, Running
from offload.serve.worker import Busy, Job, Worker

WAIT_S = 60  # a bound on waiting for the worker's thread, never a measured time


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Streams one token a step; a generation stops before token ``hold_at`` until ``release`` is set."""

    def __init__(self, hold_at: int | None = None) -> None:
        self.settings = SimpleNamespace(threads=torch.get_num_threads())
        self.model = SimpleNamespace(expert_source=SimpleNamespace(stats=None))
        self.hold_at = hold_at
        self.held, self.release = threading.Event(), threading.Event()

    def stream(self, prompt_ids: list[int], *, max_new_tokens: int, **_: object) -> Iterator[Response]:
        for step in range(max_new_tokens):
            if step == self.hold_at:
                self.held.set()  # the worker has taken every token before this one
                assert self.release.wait(WAIT_S)
            yield Response(step, "x", "length" if step == max_new_tokens - 1 else None)

    def host_tier_stats(self) -> None:
        return None


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _job(loop: asyncio.AbstractEventLoop, max_new_tokens: int) -> Job:
    return Job(SamplingParams(), max_new_tokens, (), loop, prompt_ids=[1])


def _start(monkeypatch: pytest.MonkeyPatch, engine: FakeEngine, queue_size: int, clock: FakeClock) -> Worker:
    monkeypatch.setattr(worker_module, "ChatSession", lambda engine: None)  # completions only here
    return Worker(engine, queue_size, clock=clock)  # type: ignore[arg-type]


def _stop(worker: Worker, engine: FakeEngine) -> None:
    engine.release.set()
    worker.stop()
    worker._thread.join(WAIT_S)
    assert not worker._thread.is_alive()


@pytest.mark.parametrize("queued_tokens, retry_after", [(100, 190), (400, 490)])
def test_retry_after_counts_the_running_job_and_grows_with_the_work_queued(
    monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop, queued_tokens: int, retry_after: int
) -> None:
    clock, engine = FakeClock(), FakeEngine(hold_at=10)
    worker = _start(monkeypatch, engine, 1, clock)
    try:
        worker.submit(_job(loop, 100))
        assert engine.held.wait(WAIT_S)
        clock.now = 10.0  # 10 tokens in 10 s: 1 s a token, 90 to go
        worker.submit(_job(loop, queued_tokens))
        with pytest.raises(Busy) as busy:
            worker.submit(_job(loop, 1))
        assert busy.value.retry_after == retry_after  # 90 + the queued job's tokens, at 1 s each
        assert f"retry after {retry_after} s" in str(busy.value)
    finally:
        _stop(worker, engine)


def test_the_pace_of_past_jobs_and_the_typical_answer_length_set_the_estimate() -> None:
    pace = Pace()
    assert pace.retry_after(None, [4000]) == 1  # nothing timed yet: a second a job
    assert pace.retry_after(Running(30.0, 0, 4000), [4000, 4000]) == 3
    pace.record(25.0, 100, answered=True)  # 0.25 s a token; answers run about 100 tokens
    # The running job has 80 of its typical 100 tokens to go, each queued one 100: 280 tokens at 0.25 s.
    assert pace.retry_after(Running(5.0, 20, 4000), [4000, 4000]) == 70
    assert pace.retry_after(Running(5.0, 20, 4000), [4000, 4000, 4000]) == 95
    assert pace.retry_after(Running(0.0, 0, 10), [10]) == 5  # max_tokens under the typical length
    assert pace.retry_after(Running(50.0, 490, 500), []) == 1  # past the typical length: at least 1 s
    pace.record(1.0, 5, answered=False)  # a cancelled job counts for the pace, not for the length
    assert pace.retry_after(None, [4000]) == 25  # 21 s over 85 tokens (decayed), 100 tokens ahead


def test_health_says_idle_by_the_time_the_answer_is_handed_over(
    monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop
) -> None:
    engine = FakeEngine()
    worker = _start(monkeypatch, engine, 1, FakeClock())
    job = _job(loop, 3)
    seen: list[tuple[str, dict]] = []
    handed = threading.Event()

    def emit(event: object) -> None:  # what /health would say the moment each event reaches the client
        seen.append((type(event).__name__, worker.status()))
        if type(event).__name__ == "Finish":
            handed.set()

    job.emit = emit  # type: ignore[method-assign]
    try:
        worker.submit(job)
        assert handed.wait(WAIT_S)
        name, status = seen[-1]
        assert name == "Finish" and status["served"] == 1
        assert not status["busy"] and status["queued"] == 0
    finally:
        _stop(worker, engine)
