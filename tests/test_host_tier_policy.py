"""The engine's host tier under its default policy, adaptive, and under cyclic (issue 17): the same victims as
the two-level replay, counting only what it hands out, weighing down what the device holds; the profile's
[host] policy."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from offload.errors import CacheError, ProfileError
from offload.experts.host_tier import HostTier
from offload.experts.policy import DEFAULT_HOST_POLICY
from offload.trace.replay_tiers import replay_two_level
from tests.test_host_tier import make_tier
from tests.test_plan_speed import profile
from tests.test_trace_replay import make_trace


def serve(tier: HostTier, layer: int, experts: list[int]) -> None:
    """One step of a layer as the host-only path makes it: fetch each (those in the tier first), read it,
    hand it to a job, step."""
    for expert in sorted(experts, key=lambda e: not tier.is_ready(layer, e)):
        tier.fetch(layer, expert)
    for expert in experts:
        tier.tensors(layer, expert)
        tier.hold(layer, expert, lambda: True, lambda: None)
    tier.note_step(layer, experts)


def reads(tier: HostTier) -> int:
    return tier.stats.total().misses


def test_the_tiers_default_is_adaptive_and_a_bad_policy_is_one_line(tmp_path: Path) -> None:
    assert DEFAULT_HOST_POLICY == "adaptive"
    with pytest.raises(
        CacheError, match=r"host-tier policy 'mru' is not one of adaptive, cyclic, lrfu, lru$"
    ):
        make_tier(tmp_path, slots=2, policy="mru")


def test_cyclic_keeps_the_expert_its_layer_needs_next(tmp_path: Path) -> None:
    # tests/test_host_policy.py's hand case, through the engine's tier: three layers, top-1, a pool of 2.
    # Step 0 asks layers 0, 1, 2 for expert 0; step 1 asks layer 0 for 1, layers 1 and 2 for 0 again.
    # LRU reads 6; cyclic keeps (2, 0) (at step 0 it drops (1, 0), whose layer comes round last): 5.
    steps = [[[0], [0], [0]], [[1], [0], [0]]]
    for policy, want in (("lru", 6), ("cyclic", 5)):
        (tmp_path / policy).mkdir()
        tier = make_tier(tmp_path / policy, slots=2, layers=3, experts=2, policy=policy)
        for step in steps:
            for layer, experts in enumerate(step):
                serve(tier, layer, experts)
        assert reads(tier) == want, policy


def test_the_tier_reads_what_the_replay_reads(tmp_path: Path) -> None:
    # Three layers of four experts, top-2, prompts (prefills of 3 tokens) between decode steps, a pool of
    # 5: the engine's tier under cyclic reads exactly as many experts as the two-level replay at K = 0,
    # forgetting at each prompt as the replay does.
    rng = random.Random(7)
    steps = []
    for step in range(60):
        tokens = 3 if step % 20 == 0 else 1
        steps.append([[sorted(rng.sample(range(4), 2)) for _ in range(tokens)] for _ in range(3)])
    trace = make_trace(steps, num_experts=4)
    for policy in ("cyclic", "adaptive"):
        (tmp_path / policy).mkdir()
        tier = make_tier(tmp_path / policy, slots=5, layers=3, experts=4, policy=policy, min_slots=2)
        for step in range(trace.steps):
            for layer in range(3):
                serve(tier, layer, trace.needed_by_layer[layer][step])
        replayed = replay_two_level(trace, "lru", 0, policy, 5)
        assert reads(tier) == replayed.host_misses, policy
        assert replayed.host_misses < replay_two_level(trace, "lru", 0, "lru", 5).host_misses, policy


def test_adaptive_switches_rules_in_the_engines_tier_as_in_the_replay(tmp_path: Path) -> None:
    # tests/test_host_policy.py's drift case (one layer, a pool of 2: expert 0 twenty times, then 1 and 2 by
    # turns): the engine's tier reads what the replay reads, 27 under adaptive against 41 under cyclic.
    seq = [0] * 20 + [1, 2] * 25
    for policy, want in (("cyclic", 41), ("adaptive", 27)):
        (tmp_path / policy).mkdir()
        tier = make_tier(tmp_path / policy, slots=2, layers=1, experts=3, policy=policy)
        for expert in seq:
            serve(tier, 0, [expert])
        assert reads(tier) == want, policy


def test_cyclic_drops_the_tiers_copy_of_what_the_device_holds(tmp_path: Path) -> None:
    # Two layers, a pool of 2 holding (0, 0) and (1, 0), each asked for once; layer 1 now needs (1, 1).
    # (0, 0)'s layer comes round next, so without the device's help (1, 0) goes (1 - 0.2 < 0.999 - 0.1);
    # when the device holds (0, 0), its count weighs 0.8 of itself, and (0, 0) goes instead.
    for held, evicted in ((set(), (1, 0)), ({(0, 0)}, (0, 0))):
        path = tmp_path / str(len(held))
        path.mkdir()
        tier = make_tier(path, slots=2, layers=2, experts=2, policy="cyclic")
        serve(tier, 0, [0])
        serve(tier, 1, [0])
        serve(tier, 0, [])  # layer 0's next step asks the tier for nothing: a device hit
        tier.on_device = lambda layer, expert, held=held: (layer, expert) in held
        serve(tier, 1, [1])
        assert evicted not in tier.resident() and (1, 1) in tier.resident()


def test_the_profile_names_the_tiers_policy_in_one_line() -> None:
    assert profile({}).host.policy == "adaptive"
    assert profile({"policy": "lrfu"}).host.policy == "lrfu"
    assert profile({"policy": "cyclic"}).host.policy == "cyclic"
    allowed = "'adaptive' or 'cyclic' or 'lrfu' or 'lru'"
    with pytest.raises(ProfileError, match=rf"host.policy = \"mru\": allowed is {allowed}"):
        profile({"policy": "mru"})
