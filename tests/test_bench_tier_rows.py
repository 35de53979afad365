"""Bench rows that share a host tier do not inherit each other's tier: two identical rows report the same
host-tier counters, whatever row runs between them."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.bench.ablation import build_source
from offload.bench.measure import RowResult, measure_rows
from offload.loading import OffloadOptions, load_model
from tests.baby import BabySpec, write_baby
from tests.test_host_tier_model import PROMPT, half_the_experts


@pytest.fixture(scope="module")
def baby(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bench-tier")
    write_baby(
        BabySpec("bench-tier", hidden_size=32, intermediate_size=64, num_hidden_layers=3, seed=3), directory
    )
    return directory


def test_two_identical_rows_report_the_same_tier_counters(baby: Path) -> None:
    budget = half_the_experts(load_model(baby, offload=OffloadOptions(experts_per_layer=2)))
    model = load_model(baby, offload=OffloadOptions(experts_per_layer=1, host_memory_gib=budget, prefetch=0))
    tier = model.expert_source.host_tier
    assert tier is not None and tier.slots < tier.num_layers * tier.num_experts

    def row(name: str, variant: str, slots: int) -> tuple[RowResult, object]:
        source = build_source(variant, model, tier, model.expert_source.cache.link, slots, prefetch=0)
        return RowResult(name, variant, slots, 0), source

    # A row with other demands (one slot, emptied every token) between the two identical ones: before, the
    # second started from the tier that row left, and the first from the second's.
    rows = [row("first", "no-prefetch", 2), row("between", "naive", 1), row("again", "no-prefetch", 2)]
    first, between, again = measure_rows(rows, model, PROMPT, new_tokens=6, runs=2)
    assert first.tokens == again.tokens == between.tokens
    assert first.tier_prefill is not None and first.tier_decode is not None
    assert first.tier_prefill.accesses > 0 and first.tier_decode.misses > 0  # the tier is really exercised
    for phase in ("tier_prefill", "tier_decode", "prefill", "decode"):  # the tier's, then the device cache's
        assert counts(getattr(first, phase)) == counts(getattr(again, phase)), phase


def counts(stats: object) -> dict[str, int]:
    """The counters, without the seconds waited (timings differ between any two runs)."""
    return {name: value for name, value in vars(stats).items() if isinstance(value, int)}
