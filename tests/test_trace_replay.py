"""Cache-policy replay of routing traces, checked by hand and against an exhaustive optimum."""

from __future__ import annotations

import functools
import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.errors import TraceError
from offload.trace.format import Trace
from offload.trace.replay import POLICIES, replay, replay_table


def make_trace(
    steps: list[list[list[list[int]]]],
    num_experts: int,
    guesses: dict[tuple[int, int], list[int]] | None = None,
    expert_bytes: tuple[int, ...] | None = None,
) -> Trace:
    """A trace from ``steps[step][layer][token]`` = that token's k expert ids at that layer."""
    num_layers, top_k = len(steps[0]), len(steps[0][0][0])
    ids = [np.array(step, dtype=np.int32).transpose(1, 0, 2) for step in steps]  # (T, L, k) each
    counts = np.zeros((len(steps), num_layers), dtype=np.int32)
    flat: list[int] = []
    for (step, layer), guessed in sorted((guesses or {}).items()):
        counts[step, layer] = len(guessed)
        flat += guessed
    ids_array = np.concatenate(ids)
    return Trace(
        model="hand-made",
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        step_tokens=np.array([len(step_ids) for step_ids in ids], dtype=np.int32),
        ids=ids_array,
        weights=np.full(ids_array.shape, 1 / top_k, dtype=np.float32),
        guess_counts=counts,
        guesses=np.array(flat, dtype=np.int32),
        expert_bytes=expert_bytes,
    )


def sequence(experts: list[int], num_experts: int = 4) -> Trace:
    """One layer, one token per step, top-1: the textbook paging setting."""
    return make_trace([[[[e]]] for e in experts], num_experts)


def hits(trace: Trace, k: int) -> dict[str, int]:
    return {policy: replay(trace, policy, k).hits for policy in ("lru", "lfu", "belady")}


# --- replay by hand --------------------------------------------------------------------------


def test_policies_differ_on_a_short_sequence() -> None:
    # K=2, uses 0 1 0 2 1 2 (m = miss, h = hit; the cache after each step in brackets).
    # LRU:    0m[0] 1m[0,1] 0h 2m evicts 1 (used longest ago)[0,2] 1m evicts 0[2,1] 2h         -> 2 hits
    # LFU:    0m 1m 0h(0 used twice) 2m evicts 1 (once)[0,2] 1m evicts 2 (once)[0,1]
    #         2m: 0 and 1 both used twice, 0 less recently -> evicts 0                        -> 1 hit
    # Belady: 0m 1m 0h 2m: 0 is never used again, 1 at step 4 -> evicts 0[1,2] 1h 2h           -> 3 hits
    assert hits(sequence([0, 1, 0, 2, 1, 2]), 2) == {"lru": 2, "lfu": 1, "belady": 3}


def test_lfu_resists_a_scan_that_flushes_lru() -> None:
    # K=2, uses 0 0 0 1 2 0: a hot expert, then a scan of two cold ones.
    # LRU:    0m 0h 0h 1m[0,1] 2m evicts 0 (used at step 2, 1 at step 3)[1,2] 0m              -> 2 hits
    # LFU:    ... 2m evicts 1 (used once, 0 three times)[0,2] 0h                              -> 3 hits
    # Belady: ... 2m: 1 is never used again, 0 at step 5 -> evicts 1, 0h                      -> 3 hits
    assert hits(sequence([0, 0, 0, 1, 2, 0]), 2) == {"lru": 2, "lfu": 3, "belady": 3}


def test_lrfu_forgets_a_hot_expert_that_went_cold_where_lfu_never_does() -> None:
    # K=2, uses 0 0 0 1 2 1 2 1 2. LRFU counts (after each step: every count x 0.9, +1 if used):
    # 0m 0h 0h (u0 = 2.71) 1m[0,1] (u0 2.439, u1 1) 2m evicts 1 (1 < 2.439)[0,2] (2.195, 0.9, 1)
    # 1m evicts 2 (1 < 2.195)[0,1] (1.976, 1.81, 0.9) 2m evicts 1 (1.81 < 1.976)[0,2] (1.778, 1.629, 1.81)
    # 1m evicts 0 (1.778 < 1.81)[2,1] 2h                                                         -> 3 hits
    # LRU: ... 2m evicts 0 (used longest ago)[1,2], then 1 and 2 always hit                     -> 6 hits
    # LFU: 0's three uses outweigh 1 and 2 until step 8, where 0 and 1 tie at 3 and 0 goes       -> 2 hits
    # Belady: 2m evicts 0 (never used again), then every access hits                            -> 6 hits
    trace = sequence([0, 0, 0, 1, 2, 1, 2, 1, 2])
    assert hits(trace, 2) == {"lru": 6, "lfu": 2, "belady": 6}
    assert replay(trace, "lrfu", 2).hits == 3


def test_lrfu_keeps_an_expert_that_returns_often_where_lru_drops_it() -> None:
    # K=2, uses 0 1 0 2 0 3 0 4 1 0: 0 comes back every other step, each time after a newcomer.
    # Both keep 0 through the newcomers (it is always the most recent and the most used), so the
    # difference is at step 8 (1 again) and 9 (0 again):
    # LRU: [0,4] at step 8, 1m evicts 0 (used at 6; 4 at 7)[4,1], 0m                            -> 3 hits
    # LRFU: u0 is about 2.70 and u4 1 before step 8, so 1m evicts 4[0,1], 0h                     -> 4 hits
    trace = sequence([0, 1, 0, 2, 0, 3, 0, 4, 1, 0], num_experts=5)
    assert replay(trace, "lru", 2).hits == 3
    assert replay(trace, "lrfu", 2).hits == 4


def test_a_cycle_longer_than_the_cache_defeats_lru_and_lfu() -> None:
    # K=2, uses (0 1 2) three times.
    # LRU always evicts the expert needed next: 9 misses. LFU: counts stay tied or favour the
    # expert just evicted, and ties go to the least recently used, so it behaves as LRU: 9 misses.
    # Belady: 0m 1m 2m evicts 1 (next at 4; 0 at 3)[0,2] 0h 1m evicts 0 (next at 6; 2 at 5)[2,1]
    #         2h 0m evicts 2 (next at 8; 1 at 7)[1,0] 1h 2m (0, 1 never again: lowest id 0 goes) -> 3 hits
    trace = sequence([0, 1, 2] * 3)
    assert hits(trace, 2) == {"lru": 0, "lfu": 0, "belady": 3}
    result = replay(trace, "belady", 2, expert_bytes=10)
    assert (result.accesses, result.misses, result.loads, result.bytes_moved) == (9, 6, 6, 60)
    assert result.bytes_per_token == pytest.approx(60 / 9)
    assert result.hit_rate == pytest.approx(3 / 9)


def test_a_step_needing_more_than_k_streams_the_overflow() -> None:
    # One layer, top-2, K=2. Step 0 is a prefill of two tokens needing {0,1,2,3}; then {2,3}; then {0,1}.
    # Step 0: 4 misses, 4 loads; two fill the slots and two stream through without staying.
    # LRU keeps the lowest ids, 0 and 1: step 1 misses 2 and 3 (evicting 0, 1); step 2 misses 0, 1 -> 0 hits.
    # Belady keeps the two used soonest, 2 and 3: step 1 hits both; step 2 misses 0, 1        -> 2 hits.
    trace = make_trace([[[[0, 1], [2, 3]]], [[[2, 3]]], [[[0, 1]]]], num_experts=4)
    lru, belady = replay(trace, "lru", 2), replay(trace, "belady", 2)
    assert (lru.accesses, lru.hits, lru.misses, lru.loads, lru.streamed) == (8, 0, 8, 8, 2)
    assert (belady.accesses, belady.hits, belady.misses, belady.loads, belady.streamed) == (8, 2, 6, 6, 2)


def test_prefetch_by_hand() -> None:
    # Two layers, top-2, one token per step, K=3. Layer 0 always needs {0,1}. Layer 1 needs {0,1},
    # then {2,3} twice; layer 0 guessed [2,3] for it at step 1 (right) and [0,1] at step 2 (wrong).
    # Layer 0: 2 misses, then 4 hits; 2 loads.
    # Layer 1: step 0: 2 misses, 2 loads; slots {0,1}.
    #   step 1: prefetch 2 into the free slot; 3 finds no slot outside the guesses and the experts
    #   step 0 used ({0,1}), so the batch stops. Needs {2,3}: 2 is a prefetch hit, 3 misses and
    #   evicts 0 (least recently used). 1 prefetch load + 1 demand load.
    #   step 2: guess 0 could only evict 2 or 3 (used at step 1) or 1 (a guess): skipped. Needs {2,3}: hits.
    #   -> accesses 6, hits 3, misses 3, loads 4, no wasted prefetch.
    steps = [[[[0, 1]], [[0, 1]]], [[[0, 1]], [[2, 3]]], [[[0, 1]], [[2, 3]]]]
    guesses = {(1, 1): [2, 3], (2, 1): [0, 1]}
    trace = make_trace(steps, num_experts=4, guesses=guesses, expert_bytes=(100, 1000))
    result = replay(trace, "lru+prefetch", 3)
    counters = (result.accesses, result.hits, result.misses, result.loads)
    assert counters == (12, 7, 5, 6)
    assert (result.prefetch_loads, result.prefetch_hits, result.wasted_prefetches) == (1, 1, 0)
    assert result.bytes_moved == 2 * 100 + 4 * 1000
    # Plain LRU ignores the guesses: one hit fewer for the same loads.
    plain = replay(trace, "lru", 3)
    assert (plain.hits, plain.loads, plain.prefetch_loads) == (6, 6, 0)
    # With K=2 every slot holds an expert the previous step used, so no guess is ever loaded.
    assert replay(trace, "lru+prefetch", 2).prefetch_loads == 0


def test_prefetching_a_resident_expert_neither_loads_nor_refreshes_it() -> None:
    # One layer, top-1, K=2: uses 0, 1, then a guess [0] (already resident) before needing 2.
    # The guess loads nothing and leaves 0 least recently used, so 2 evicts 0: then needing 0 misses.
    trace = make_trace([[[[0]]], [[[1]]], [[[2]]], [[[0]]]], num_experts=4)
    guessed = make_trace(
        [[[[0]], [[0]]], [[[0]], [[1]]], [[[0]], [[2]]], [[[0]], [[0]]]], num_experts=4, guesses={(2, 1): [0]}
    )
    assert replay(trace, "lru", 2).hits == 0
    layer_1 = replay(guessed, "lru+prefetch", 2).hits - 3  # layer 0 hits at steps 1, 2 and 3
    assert layer_1 == 0
    assert replay(guessed, "lru+prefetch", 2).prefetch_loads == 0


def test_replay_table_is_k_major_and_checks_its_arguments() -> None:
    trace = sequence([0, 1, 0, 2, 1, 2])
    rows = replay_table(trace, ["lru", "belady"], [1, 2])
    order = [(r.experts_per_layer, r.policy) for r in rows]
    assert order == [(1, "lru"), (1, "belady"), (2, "lru"), (2, "belady")]
    assert len(replay_table(trace)) == len(POLICIES) * 4  # K from 1 to E=4
    assert rows[0].bytes_moved is None and rows[0].bytes_per_token is None
    with pytest.raises(TraceError, match="unknown cache policy 'fifo'"):
        replay(trace, "fifo", 2)
    with pytest.raises(TraceError, match="from 1 to 4"):
        replay(trace, "lru", 5)
    with pytest.raises(TraceError, match="expert bytes"):
        replay(trace, "lru", 2, expert_bytes=[1, 2])
    assert json.dumps(rows[0].as_dict())


def optimum_hits(steps: tuple[frozenset[int], ...], k: int) -> int:
    """The most hits any demand-loading cache of k slots can get, by trying every eviction."""

    @functools.cache
    def best(index: int, cache: frozenset[int]) -> int:
        if index == len(steps):
            return 0
        needed = steps[index]
        misses, free = needed - cache, k - len(cache)
        evictions = max(0, len(misses) - free)
        options = itertools.combinations(sorted(cache - needed), evictions)
        return len(needed & cache) + max(best(index + 1, (cache - set(out)) | misses) for out in options)

    return best(0, frozenset())


@settings(max_examples=150, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda experts: st.tuples(
            st.just(experts),
            st.lists(
                st.lists(
                    st.lists(st.integers(0, experts - 1), min_size=2, max_size=2, unique=True),
                    min_size=1,
                    max_size=2,
                ),
                min_size=1,
                max_size=8,
            ),
            st.integers(1, experts),
        )
    )
)
def test_belady_is_the_optimum_when_no_step_overflows(case: tuple[int, list[list[list[int]]], int]) -> None:
    experts, tokens_per_step, k = case
    trace = make_trace([[step] for step in tokens_per_step], experts)
    steps = tuple(frozenset(trace.needed(s, 0)) for s in range(trace.steps))
    if any(len(step) > k for step in steps):
        k = max(len(step) for step in steps)
    found = {policy: replay(trace, policy, k).hits for policy in ("lru", "lfu", "belady")}
    assert found["belady"] == optimum_hits(steps, k)
    assert found["lru"] <= found["belady"] and found["lfu"] <= found["belady"]
