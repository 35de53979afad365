"""The host tier's policies (issue 17): cyclic's and adaptive's victims by hand, and the replay with them."""

from __future__ import annotations

import pytest

from offload.experts import policy
from offload.experts.adaptive_policy import MIN_RATE, RECENT_DECAY, AdaptivePolicy, next_request_worth
from offload.experts.policy import (
    CYCLIC_DEVICE_WEIGHT,
    CYCLIC_STEP_WEIGHT,
    DEFAULT_HOST_POLICY,
    HOST_TIER_POLICIES,
    choose_cyclic_victim,
    cycle_distance,
    starts_prompt,
)
from offload.trace.replay_tiers import HOST_POLICIES, replay_two_level
from tests.test_trace_replay import make_trace


def test_cycle_distance_counts_layer_steps_to_the_layers_next_visit() -> None:
    # Four layers, the model at layer 1: layers 2 and 3 come later in this token, 0 and 1 in the next one.
    assert [cycle_distance(layer, 1, 4) for layer in range(4)] == [3, 4, 1, 2]
    assert cycle_distance(0, 0, 1) == 1  # one layer: every expert is next wanted at the next step


def test_cyclic_victim_by_hand() -> None:
    requests = [[1.0, 3.0], [1.0, 0.5], [1.0, 2.0], [1.0, 1.0]]  # [layer][expert], four layers of two
    # Equal counts: the expert whose layer comes round last goes. At layer 1, layer 1 is next run in 4
    # layer steps, layer 0 in 3, layer 3 in 2, layer 2 in 1.
    assert choose_cyclic_victim([(2, 0), (0, 0), (1, 0), (3, 0)], requests, 1, 4) == (1, 0)
    assert choose_cyclic_victim([(2, 0), (0, 0), (3, 0)], requests, 1, 4) == (0, 0)
    # At layer 3 the same experts order the other way round: layer 3 is the furthest, then 2, 1, 0.
    assert choose_cyclic_victim([(0, 0), (1, 0), (2, 0)], requests, 3, 4) == (2, 0)
    # A real difference in requests outweighs the distance: (1, 1), asked for half as often, goes though
    # layer 1 is the very next; and layer 0's expert 1 (3 requests) stays though layer 0 is the furthest.
    assert choose_cyclic_victim([(0, 1), (1, 1), (2, 0)], requests, 0, 4) == (1, 1)
    assert choose_cyclic_victim([(0, 1), (2, 1)], requests, 0, 4) == (2, 1)
    # Counts a little apart (the decay's rounding) are ordered by the cycle, not by the difference.
    nearly = [[0.0], [0.0], [1.0], [0.0, 1.0 + CYCLIC_STEP_WEIGHT / 2]]
    assert choose_cyclic_victim([(2, 0), (3, 1)], nearly, 1, 4) == (3, 1)
    # Same layer, same count: the least recently requested (the first candidate) goes.
    assert choose_cyclic_victim([(3, 1), (3, 0)], requests, 0, 4) == (3, 1)
    # Unless the device holds the other: the tier's copy of it waits for the device to evict it.
    held = {(3, 0)}
    assert choose_cyclic_victim([(3, 1), (3, 0)], requests, 0, 4, lambda *key: key in held) == (3, 0)
    # A device-held expert's count is weighed down (x CYCLIC_DEVICE_WEIGHT), not ignored: 3 requests held
    # by the device still outweigh 1 that is not.
    assert choose_cyclic_victim([(0, 1), (3, 1)], requests, 1, 4, lambda *key: key == (0, 1)) == (3, 1)


def test_adaptive_is_the_host_tiers_default_and_cyclic_a_choice() -> None:
    assert DEFAULT_HOST_POLICY == "adaptive" and "cyclic" in HOST_TIER_POLICIES
    assert set(HOST_TIER_POLICIES) <= set(HOST_POLICIES)


def test_cyclic_keeps_the_expert_its_layer_needs_next() -> None:
    # Three layers, top-1, K = 0 (the tier sees every access), a pool of 2 slots.
    # Step 0 asks layer 0, 1, 2 for expert 0; step 1 asks layer 0 for 1, layers 1 and 2 for 0 again.
    # LRU (and LFU, LRFU: every count is 1, ties to the least recent) evicts in request order and never
    # hits: at step 0's (2, 0) it drops (0, 0); at step 1 each miss drops the very expert asked for next:
    # 6 reads. Cyclic, at (2, 0), drops (1, 0) (layer 1 comes round last); at (0, 1), (0, 0) (layer 0,
    # furthest); at (1, 0), (0, 1) (layer 0 again), keeping (2, 0): one hit, 5 reads, as few as Belady.
    trace = make_trace([[[[0]], [[0]], [[0]]], [[[1]], [[0]], [[0]]]], num_experts=2)
    reads = {p: replay_two_level(trace, "lru", 0, p, 2).host_misses for p in HOST_POLICIES}
    # adaptive: both its rules keep (2, 0) here (the shadows tie, so it follows cyclic).
    assert reads == {"adaptive": 5, "cyclic": 5, "lru": 6, "lrfu": 6, "lfu": 6, "belady": 5}


def test_cyclic_counts_only_the_tiers_requests() -> None:
    # One layer, top-1, K = 1 device slot (LRU), a pool of 2: uses 0 0 1 2 0 1; the tier is asked for
    # 0 1 2 0 1 (0's second use is a device hit). Counting every access, LFU keeps 0 (used twice) when 2
    # arrives: 4 reads. Cyclic counts requests: 0 and 1 were asked for once each, 0 longer ago (its
    # count decayed more), so 0 goes, then 1, then 2: 5 reads, as LFU counting requests.
    trace = make_trace([[[[e]]] for e in (0, 0, 1, 2, 0, 1)], num_experts=4)
    assert replay_two_level(trace, "lru", 1, "lfu", 2).host_misses == 4
    assert replay_two_level(trace, "lru", 1, "lfu", 2, counts="requests").host_misses == 5
    for counts in ("accesses", "requests"):
        assert replay_two_level(trace, "lru", 1, "cyclic", 2, counts=counts).host_misses == 5


def test_a_prompt_starts_where_the_first_layer_uses_more_than_one_token_can() -> None:
    assert starts_prompt(0, [1, 4, 5], top_k=2)  # a prefill: several tokens, more than top-2 experts
    assert not starts_prompt(0, [1, 4], top_k=2)  # a decode step: one token, its top-2
    assert not starts_prompt(1, [0, 1, 2, 3], top_k=2)  # only the first layer marks a step


def test_cyclic_starts_counting_again_with_each_prompt() -> None:
    # One layer, top-1, K = 0, a pool of 2. Prompt 1 (a 3-token prefill on experts 0 0 1, then 0 0) leaves
    # 0 with 3 requests and 1 with 1; prompt 2 (a 2-token prefill on 0 and 2, evicting 1; then 3 2 3 2)
    # never asks for 0 again. Counts kept across prompts (LFU) pin 0 in a slot, and 2 and 3 evict each
    # other: 4 reads after the prefill, 7 in all. Cyclic forgets at prompt 2's prefill (its first layer
    # uses 2 experts, more than top-1): 0 and 2 have 1 request each, 0 the older, so 3 evicts 0 and
    # 2 and 3 stay: 4 reads in all, as few as Belady.
    steps = [[[[0], [0], [1]]], [[[0]]], [[[0]]], [[[0], [2]]], [[[3]]], [[[2]]], [[[3]]], [[[2]]]]
    trace = make_trace(steps, num_experts=4)
    assert replay_two_level(trace, "lru", 0, "lfu", 2, counts="requests").host_misses == 7
    assert replay_two_level(trace, "lru", 0, "cyclic", 2).host_misses == 4
    assert replay_two_level(trace, "lru", 0, "belady", 2).host_misses == 4


def test_cyclic_drops_the_tiers_copy_of_what_the_device_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two layers, top-1, K = 1 device slot (LRU), a pool of 2. Layer 0 uses 0 at every step (one device
    # miss, then hits); layer 1 uses 0 1 0 (all misses). The tier is asked for (0, 0) and (1, 0), then
    # (1, 1), then (1, 0). For (1, 1) it evicts (0, 0) (0.999 requests, its layer next) or (1, 0) (1
    # request, its layer furthest). Without the device's help: 0.999 - 0.1 > 1 - 0.2, so (1, 0) goes and is
    # read again at step 2: 4 reads. The device holds (0, 0): 0.8 x 0.999 - 0.1 < 0.8, so (0, 0) goes and
    # (1, 0) is a hit: 3 reads, as few as Belady.
    trace = make_trace([[[[0]], [[0]]], [[[0]], [[1]]], [[[0]], [[0]]]], num_experts=3)
    assert CYCLIC_DEVICE_WEIGHT == 0.8 and CYCLIC_STEP_WEIGHT == 0.1
    cyclic = replay_two_level(trace, "lru", 1, "cyclic", 2)
    assert (cyclic.host_accesses, cyclic.host_misses) == (4, 3)
    assert replay_two_level(trace, "lru", 1, "belady", 2).host_misses == 3
    monkeypatch.setattr(policy, "CYCLIC_DEVICE_WEIGHT", 1.0)  # the device's slots ignored
    assert replay_two_level(trace, "lru", 1, "cyclic", 2).host_misses == 4


def test_next_request_worth_by_hand() -> None:
    # Four layers, the model at layer 1. Expert (3, 0): layer 3 is next run in 2 layer steps; asked for at
    # 1 of 4 visits (rate 0.25), recent share 0.5: it waits 2 + (1 - 0.5) x 4 / 0.25 = 10 layer steps.
    requests, visits = [[0.0, 0.0]] * 3 + [[1.0, 0.0]], [4.0] * 4
    recent = [[0.0, 0.0]] * 3 + [[0.5, 0.0]]
    assert next_request_worth((3, 0), requests, visits, recent, 1, 4) == pytest.approx(-10.0)
    # Never asked for: its rate is floored at MIN_RATE, so it waits L / MIN_RATE after its layer comes round.
    assert next_request_worth((3, 1), requests, visits, recent, 1, 4) == pytest.approx(-(2 + 4 / MIN_RATE))
    # Held by the device: share and rate x CYCLIC_DEVICE_WEIGHT (0.8): 2 + 0.6 x 4 / 0.2 = 14.
    held = lambda *key: key == (3, 0)  # noqa: E731
    assert next_request_worth((3, 0), requests, visits, recent, 1, 4, held) == pytest.approx(-14.0)


def test_adaptive_follows_the_rule_whose_shadow_missed_less() -> None:
    # One layer of three experts, a pool of 2: expert 0 asked for 20 times, then 1 and 2 by turns. Both
    # shadows hold 0 and thrash between 1 and 2 (one miss each a step) until the next-request shadow drops
    # 0 at step 43: 0's recent share has decayed to 0.9^23 of its peak while its request count (19.3)
    # still keeps it under cyclic. From step 44 that shadow hits and cyclic's misses, so the rule leads.
    policy = AdaptivePolicy(slots=2, num_layers=1, num_experts=3)
    seq = [0] * 20 + [1, 2] * 25
    for step, expert in enumerate(seq[:44]):
        policy.note_step(0, [expert], starts_prompt=False)
        assert policy.leader == 0, step  # ties go to cyclic
    assert policy.missed[0] == pytest.approx(policy.missed[1])
    policy.note_step(0, [seq[44]], starts_prompt=False)
    assert policy.leader == 1 and policy.missed[1] < policy.missed[0]
    # The victims now: cyclic would keep 0 (19.3 requests against 2's 11.9), the leader drops it (recent
    # share 0.06 against 0.44).
    assert policy.victim([(0, 0), (0, 2)], 0, rule=0) == (0, 2)
    assert policy.victim([(0, 0), (0, 2)], 0) == (0, 0)
    # The replay of the same trace: cyclic thrashes for 40 reads after the first; adaptive follows it until
    # the switch (1 + 25 reads: steps 20 to 44), then evicts 0 at step 45's miss and hits ever after.
    trace = make_trace([[[[e]]] for e in seq], num_experts=3)
    reads = {p: replay_two_level(trace, "lru", 0, p, 2).host_misses for p in ("cyclic", "adaptive", "belady")}
    assert reads == {"cyclic": 41, "adaptive": 27, "belady": 3}


def test_a_new_prompt_forgets_adaptives_counts_but_not_its_shadows() -> None:
    policy = AdaptivePolicy(slots=2, num_layers=2, num_experts=2)
    policy.note_step(0, [0, 1], starts_prompt=False)
    policy.note_step(1, [0], starts_prompt=False)
    assert policy.requests == [[1.0, 1.0], [1.0, 0.0]] and policy.visits == [1.0, 1.0]
    policy.note_step(0, [1], starts_prompt=True)
    assert policy.requests == [[0.0, 1.0], [0.0, 0.0]] and policy.visits == [1.0, 0.0]
    assert policy.recent[0] == pytest.approx([0.0, 1 - RECENT_DECAY]) and policy.missed[0] > 0
