"""How far the real cache is from the optimum: one recorded run of ``copy-only`` (where every miss is a
load), replayed against Belady.

The run starts with empty slots and is recorded with ``offload.trace.recorder.TraceRecorder``. Its measured
bytes (the cache's own counters) are compared with ``offload.trace.replay`` of the same trace under
``belady`` (the fewest loads any demand policy can make, knowing the future), ``lru``, ``lrfu``,
``lfu`` and the two cache policies with the recorded guesses (``lru+prefetch`` is the paper's
algorithm; the run's own policy with prefetch is what the cache should have done), twice:
- ``whole``: the whole run, prefill included (a long prefill loads nearly every expert whatever the policy);
- ``decode``: the decode steps alone, replayed from empty slots at the first decode step, which
  isolates the steady state that the cache policy is about.
Prefetching trades bandwidth for latency: its wrong guesses are bytes Belady never moves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from offload.bench.measure import run_once
from offload.loading import attach_source
from offload.model import MixtralModel
from offload.trace.recorder import TraceRecorder
from offload.trace.replay import replay

POLICIES = ("belady", "lru", "lrfu", "lfu", "lru+prefetch", "lrfu+prefetch")


def policy_check(
    model: MixtralModel,
    source: Any,
    prompt_ids: list[int],
    new_tokens: int,
    experts_per_layer: int,
    cache_policy: str,
) -> dict[str, Any]:
    """Record one greedy run of ``source`` (fresh, empty slots, evicting by ``cache_policy``) and replay
    it; see the module docstring.

    Returns the JSON block ``policy_check`` of the bench report, plus ``tokens``: the run's ids.
    """
    attach_source(model, source)
    with TraceRecorder(model, model_name="bench") as recorder:
        run = run_once(model, prompt_ids, new_tokens)
    trace = recorder.trace()
    decode_trace = decode_steps(trace)

    def replays(of: Any) -> dict[str, int | None]:
        return {policy: replay(of, policy, experts_per_layer).bytes_moved for policy in POLICIES}

    whole, decode = replays(trace), replays(decode_trace)
    measured_whole = run.prefill.bytes_moved + run.decode.bytes_moved
    return {
        "experts_per_layer": experts_per_layer,
        "cache_policy": cache_policy,
        "steps": trace.steps,
        "whole": {
            "measured_bytes": measured_whole,
            "replay_bytes": whole,
            "measured_over_belady": _ratio(measured_whole, whole["belady"]),
        },
        "decode": {
            "replay_bytes": decode,
            "lru_prefetch_over_belady": _ratio(decode["lru+prefetch"], decode["belady"]),
            "lru_over_belady": _ratio(decode["lru"], decode["belady"]),
            "lrfu_prefetch_over_belady": _ratio(decode["lrfu+prefetch"], decode["belady"]),
            "lrfu_over_belady": _ratio(decode["lrfu"], decode["belady"]),
        },
        "tokens": run.tokens,
    }


def decode_steps(trace: Any) -> Any:
    """The trace without its first step (the prefill)."""
    prompt_tokens = int(trace.step_tokens[0])
    prefill_guesses = int(trace.guess_counts[0].sum())
    return dataclasses.replace(
        trace,
        step_tokens=trace.step_tokens[1:],
        ids=trace.ids[prompt_tokens:],
        weights=trace.weights[prompt_tokens:],
        guess_counts=trace.guess_counts[1:],
        guesses=trace.guesses[prefill_guesses:],
    )


def _ratio(part: int | None, whole: int | None) -> float | None:
    return part / whole if part is not None and whole else None
