"""The per-miss choice, from hand-made inputs whose answers are computed by hand in each test."""

from __future__ import annotations

import pytest

from offload.errors import CacheError
from offload.experts.cost_model import COPY, HOST, WAIT, CostInputs, CostModel, Miss, TokenCurve

MS = 1e-3


def inputs(host_ms: float = 1.0, device_ms: float = 0.1, copy_ms: float = 5.0) -> CostInputs:
    """A link that moves one 1 MB expert in ``copy_ms``; per-token costs linear from one token."""
    return CostInputs(
        link_gbps=1e6 / (copy_ms * MS) / 1e9,
        link_latency_us=0.0,
        expert_bytes=(1_000_000,),
        activation_bytes=0,  # no crossing cost, so the sums below stay exact
        host=TokenCurve(((1, host_ms * MS),)),
        device=TokenCurve(((1, device_ms * MS),)),
    )


def test_token_curve_interpolates_and_extrapolates_linearly() -> None:
    curve = TokenCurve(((1, 1.0), (4, 2.5), (16, 4.0)))
    assert curve.at(1) == 1.0 and curve.at(0) == 1.0
    assert curve.at(2) == pytest.approx(1.5)  # 1 + (2.5 - 1) * 1/3
    assert curve.at(10) == pytest.approx(3.25)  # 2.5 + 1.5 * 6/12
    assert curve.at(32) == pytest.approx(8.0)  # 4 s per 16 tokens
    with pytest.raises(CacheError):
        TokenCurve(((4, 1.0), (2, 1.0)))


def test_one_miss_goes_where_it_finishes_first() -> None:
    model = CostModel(inputs(host_ms=1.0, device_ms=0.1, copy_ms=5.0))
    # host: 1 ms; copy then device: 5 + 0.1 ms
    assert model.choose(0, [Miss(3, 1)], now=0.0, link_free_at=0.0, host_free_at=0.0) == {3: HOST}
    # a host busy for 10 ms: 11 ms on the host against 5.1 by copying
    assert model.choose(0, [Miss(3, 1)], now=0.0, link_free_at=0.0, host_free_at=10 * MS) == {3: COPY}


def test_misses_queue_on_the_host_and_the_link() -> None:
    model = CostModel(inputs(host_ms=2.0, device_ms=0.1, copy_ms=5.0))
    misses = [Miss(1, 1), Miss(2, 1), Miss(3, 1), Miss(4, 1)]
    # host finishes at 2, 4; the third would finish at 6 on the host, 5.1 by copy; the fourth: 6 on the
    # host against 10.1 behind the third's copy
    choices = model.choose(0, misses, now=0.0, link_free_at=0.0, host_free_at=0.0)
    assert choices == {1: HOST, 2: HOST, 3: COPY, 4: HOST}


def test_an_arriving_copy_is_waited_for_unless_the_host_is_sooner() -> None:
    model = CostModel(inputs(host_ms=1.0, device_ms=0.1, copy_ms=5.0))
    soon, late = Miss(1, 1, arriving_at=0.5 * MS), Miss(2, 1, arriving_at=4 * MS)
    assert model.choose(0, [soon, late], now=0.0, link_free_at=4 * MS, host_free_at=0.0) == {1: WAIT, 2: HOST}


def test_a_long_prefill_goes_to_the_device_from_the_measured_threshold() -> None:
    # host 1 ms a token; device 0.1 ms a token; copy 5 ms: the device wins once 5 + 0.1 T <= T, T >= 5.56
    model = CostModel(inputs(host_ms=1.0, device_ms=0.1, copy_ms=5.0))
    assert model.prefill_threshold() == 6
    assert model.choose(0, [Miss(0, 5)], 0.0, 0.0, 0.0) == {0: HOST}
    assert model.choose(0, [Miss(0, 6)], 0.0, 0.0, 0.0) == {0: COPY}


def test_the_crossing_activations_count_on_the_host_side() -> None:
    base = inputs(host_ms=1.0, device_ms=0.1, copy_ms=5.0)
    # 1 MB per token each way at 0.2 GB/s: 10 ms a token, so the host loses at one token
    heavy = CostInputs(**{**base.__dict__, "activation_bytes": 1_000_000})
    assert heavy.host_seconds(1) == pytest.approx(1 * MS + 10 * MS)
    assert CostModel(heavy).choose(0, [Miss(0, 1)], 0.0, 0.0, 0.0) == {0: COPY}


def test_modes_force_the_path() -> None:
    misses = [Miss(1, 1), Miss(2, 1, arriving_at=1.0)]
    assert CostModel(inputs(), "never").choose(0, misses, 0.0, 0.0, 0.0) == {1: COPY, 2: WAIT}
    assert CostModel(inputs(host_ms=1e6), "always").choose(0, misses, 0.0, 0.0, 0.0) == {1: HOST, 2: HOST}
    assert CostModel(inputs(), "never").prefill_threshold() is None
    with pytest.raises(CacheError, match="--host-compute 'sometimes' is not one of auto, never, always"):
        CostModel(inputs(), "sometimes")


def test_a_guess_pays_while_its_precision_beats_r_over_1_plus_r() -> None:
    from offload.experts.cost_model import guess_pays

    # a copy of 5 layers: r / (1 + r) = 5/6 = 0.833
    assert not guess_pays(0.66, copy_seconds=5e-3, layer_seconds=1e-3)
    assert guess_pays(0.84, copy_seconds=5e-3, layer_seconds=1e-3)
    # a copy of half a layer: 1/3
    assert guess_pays(0.34, copy_seconds=0.5e-3, layer_seconds=1e-3)
    assert not guess_pays(0.33, copy_seconds=0.5e-3, layer_seconds=1e-3)
    assert guess_pays(None, 5e-3, 1e-3) and guess_pays(0.1, 5e-3, None)  # nothing measured yet: try


def test_hits_move_to_the_host_while_that_ends_the_layer_sooner() -> None:
    hits = [Miss(1, 1), Miss(2, 1)]
    # device 3 ms a hit (6 in all), host 2 ms: the last hit goes to the host (done at 2 < 6, the device at
    # 3); the first would end at 4 on the host, later than the device's 3, so it stays
    model = CostModel(inputs(host_ms=2.0, device_ms=3.0))
    assert model.choose(0, [], 0.0, 0.0, 0.0, hits) == {2: HOST}
    # a host 10 times slower than the device keeps every hit on the device
    assert CostModel(inputs(host_ms=10.0, device_ms=1.0)).choose(0, [], 0.0, 0.0, 0.0, hits) == {}
    # a host busy until 5 ms takes the miss (done at 7, a copy and the device at 8); a hit would then end
    # at 9, after the device's 6: nothing moves
    assert model.choose(0, [Miss(3, 1)], 0.0, 0.0, 5e-3, hits) == {3: HOST}
    # never and always leave hits on the device
    assert CostModel(inputs(host_ms=0.1, device_ms=3.0), "never").choose(0, [], 0.0, 0.0, 0.0, hits) == {}
    assert CostModel(inputs(host_ms=0.1, device_ms=3.0), "always").choose(0, [], 0.0, 0.0, 0.0, hits) == {}
