"""A guess read early into the host tier (``HostTier.prefetch``, issue 17): it fills a free slot, and evicts
only an expert worth less than itself under the tier's policy (``guess_may_evict``), so the next layer's
guesses cannot push out what the tier is asked for most."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.experts.host_tier import HostTier
from offload.experts.policy import GUESS_FACTOR, GUESS_MARGIN, guess_may_evict
from tests.test_host_tier import make_tier
from tests.test_host_tier_policy import serve


def guess_reads(tier: HostTier) -> int:
    return tier.stats.total().prefetch_reads


def test_a_guess_never_evicts_an_expert_worth_more(tmp_path: Path) -> None:
    # Before, a guess evicted the policy's victim whatever either was worth: (0, 0) went for (1, 2).
    tier = make_tier(tmp_path, slots=2, layers=2, experts=4, policy="cyclic", min_slots=2)
    for _ in range(3):  # (0, 0) and (1, 1): asked for three times each
        serve(tier, 0, [0])
        serve(tier, 1, [1])
    before = tier.stats.total().reads
    assert not tier.prefetch(1, 2)  # a guess asked for never: worth less than either
    assert set(tier.resident()) == {(0, 0), (1, 1)}
    assert tier.stats.total().reads == before and guess_reads(tier) == 0


def test_a_free_slot_still_takes_a_guess(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, slots=3, layers=2, experts=4, policy="cyclic", min_slots=2)
    for _ in range(3):
        serve(tier, 0, [0])
        serve(tier, 1, [1])
    assert tier.prefetch(1, 2) and guess_reads(tier) == 1  # the free slot: no expert goes for it
    assert set(tier.resident()) == {(0, 0), (1, 1), (1, 2)}
    serve(tier, 1, [2])
    assert tier.stats.layers[1].misses == 1  # only (1, 1)'s first: the guess was a hit when asked for


def test_a_guess_worth_more_than_the_victim_evicts_it(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, slots=2, layers=2, experts=4, policy="cyclic", min_slots=2)
    for _ in range(6):  # (1, 2): asked for six times, then pushed out by a step of two others
        serve(tier, 1, [2])
    serve(tier, 0, [0, 1])
    assert (1, 2) not in tier.resident()
    # Worth far more than an expert asked for once (guess_may_evict's bar): it takes that expert's slot.
    assert tier.prefetch(1, 2) and guess_reads(tier) == 1
    assert (1, 2) in tier.resident() and len({(0, 0), (0, 1)} & set(tier.resident())) == 1


def test_an_lru_tiers_guess_only_fills_a_free_slot(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, slots=2, layers=2, experts=4, policy="lru")
    serve(tier, 0, [0])
    assert tier.prefetch(1, 3)  # free
    assert not tier.prefetch(1, 2)  # full: LRU has no worth to weigh a guess against
    assert set(tier.resident()) == {(0, 0), (1, 3)}


@pytest.mark.parametrize(
    ("policy", "victim", "guess", "evicts"),
    [("cyclic", 2.0, 2.0 * GUESS_FACTOR + GUESS_MARGIN + 0.1, True),
     ("cyclic", 2.0, 2.0 * GUESS_FACTOR + GUESS_MARGIN, False),
     ("cyclic", 2.0, 2.0 + GUESS_MARGIN + 0.1, False),  # the factor: more than the margin over a count
     ("cyclic", -0.3, -0.3 + GUESS_MARGIN + 0.1, True),  # a victim worth nothing: the margin alone
     ("lrfu", 1.0, GUESS_FACTOR + GUESS_MARGIN + 0.1, True), ("lrfu", 1.0, 1.0, False),
     ("lru", 0.0, 9.0, False)],
)  # fmt: skip
def test_a_guess_evicts_only_a_victim_worth_clearly_less(
    policy: str, victim: float, guess: float, evicts: bool
) -> None:
    assert guess_may_evict(policy, victim, guess) is evicts
