"""Prefetch guesses pay per layer and rank (issue 15): a rank's guesses are copied while that rank's measured
precision beats r / (1 + r); a layer's first guess is often much more precise than its second."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.experts.stats import CacheStats, LayerStats
from offload.loading import OffloadOptions, load_model
from tests.baby import BabySpec, write_baby


def test_precision_is_counted_per_rank_best_guess_first() -> None:
    stats = LayerStats()
    stats.record_guesses([5, 2], used=[5, 7])
    stats.record_guesses([5, 3], used=[3, 5])
    assert stats.prefetch_precision == 0.75  # the layer's, over both ranks
    assert stats.prefetch_precision_at(0) == 1.0 and stats.prefetch_precision_at(1) == 0.5
    assert stats.prefetch_precision_at(2) is None  # no third guess made yet
    stats.record_guesses([4, 4, 1], used=[1])  # a repeated guess counts once, at its first rank
    assert stats.guessed_by_rank == [3, 3] and stats.used_by_rank == [2, 2]


def test_the_json_gives_each_layers_precision_by_rank() -> None:
    stats = CacheStats(2)
    stats.layers[1].record_guesses([0, 1], used=[1])
    layers = stats.as_dict()["layers"]
    assert layers[0]["prefetch_precision_by_rank"] == []
    assert layers[1]["prefetch_precision_by_rank"] == [0.0, 1.0]
    assert "prefetch_precision_by_rank" not in stats.as_dict()  # totals mix layers: per layer only
    stats.reset()
    assert stats.as_dict()["layers"][1]["prefetch_precision_by_rank"] == []


@pytest.fixture(scope="module")
def baby(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("prefetch-rank")
    write_baby(BabySpec("rank", num_local_experts=8, num_hidden_layers=3, seed=5), directory)
    return directory


def test_a_rank_that_does_not_pay_is_skipped_and_the_next_rank_still_copied(baby: Path) -> None:
    options = OffloadOptions(experts_per_layer=2, prefetch=2, link="emulated:50", host_ratio=1.0)
    source = load_model(baby, dtype="float32", offload=options).expert_source
    assert source.host_path is not None  # hybrid: guesses must pay
    source.flush()
    # r = copy / layer = 1, so a guess pays above a precision of 1/2. Rank 0 was never right, rank 1 always:
    # the layer's precision (1/2) does not pay, rank 1's does.
    source._layer_seconds = source.host_path.model.inputs.copy_seconds(1)
    for _ in range(4):
        source.stats.layers[1].record_guesses([6, 7], used=[7, 0])
    source._prefetch(1, [3, 4])
    assert not source.cache.contains(1, 3)  # rank 0: skipped
    assert source.cache.contains(1, 4)  # rank 1: copied
