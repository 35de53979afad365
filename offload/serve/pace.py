"""How long the jobs ahead should take: the ``Retry-After`` of a 503 when the queue is full.

The engine's pace is measured in seconds per generated token (prefill folded in), over past jobs and
the one running now, so the first long job already counts. A job is expected to run to its
``max_new_tokens``, or to the length answers have typically had when that is shorter (most stop at
EOS long before). It is a hint for the client, not a promise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

DECAY = 0.8  # each past job counts 0.8 times as much as the one after it: the recent pace weighs most
SECONDS_PER_JOB_UNTIMED = 1.0  # the guess before any token has been timed


class Running(NamedTuple):
    """The job on the engine now."""

    elapsed_seconds: float
    generated_tokens: int
    max_new_tokens: int


class Pace:
    """Decayed sums over past jobs: seconds and tokens on the engine, and answers' lengths."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._tokens = 0.0
        self._answers = 0.0  # jobs that ended on their own (EOS, a stop string or max_new_tokens)
        self._answer_tokens = 0.0

    def record(self, seconds: float, tokens: int, *, answered: bool) -> None:
        """A job's time on the engine and its tokens; ``answered`` when it ended on its own, not cancelled."""
        self._seconds = DECAY * self._seconds + seconds
        self._tokens = DECAY * self._tokens + tokens
        if answered:  # a cancelled job's length says nothing of how long answers run
            self._answers = DECAY * self._answers + 1
            self._answer_tokens = DECAY * self._answer_tokens + tokens

    def retry_after(self, running: Running | None, queued: Sequence[int]) -> int:
        """Whole seconds, at least 1, until ``running`` and the jobs ``queued`` (their max_new_tokens) are done."""
        seconds, tokens = self._seconds, self._tokens
        if running is not None:
            seconds += running.elapsed_seconds
            tokens += running.generated_tokens
        if tokens == 0:
            jobs = len(queued) + (running is not None)
            return max(1, math.ceil(SECONDS_PER_JOB_UNTIMED * jobs))
        typical = self._answer_tokens / self._answers if self._answers else math.inf
        tokens_ahead = sum(min(most, typical) for most in queued)
        if running is not None:
            # A job already past the typical length is expected to end soon.
            expected = min(running.max_new_tokens, max(typical, running.generated_tokens))
            tokens_ahead += expected - running.generated_tokens
        # Rounded first, so that float noise (28.000000000000004) does not add a second.
        return max(1, math.ceil(round(seconds / tokens * tokens_ahead, 6)))
