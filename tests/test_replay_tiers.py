"""Two-level replay (issue 17): device slots over a host tier over the disk, counted by hand, against
Belady's optimum for the host level, and through `offload trace replay`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from offload.errors import OffloadError, TraceError
from offload.trace.format import save_trace
from offload.trace.replay import replay_layer
from offload.trace.replay_tiers import host_slots_for_budget, replay_two_level
from tests.test_trace import cli
from tests.test_trace_replay import make_trace, optimum_hits, sequence

__all__ = ["cli"]  # a fixture, used by name


def test_two_levels_by_hand() -> None:
    # One layer, top-1, uses 0 0 1 2 0 1; an expert is 100 bytes; K = 1 device slot (LRU), H = 2 host slots.
    # Device: 0m 0h 1m 2m 0m 1m -> 1 hit, 5 misses, 5 copies; the host tier is asked for 0 1 2 0 1.
    # Host LRU:    0m 1m 2m (evicts 0) 0m (evicts 1) 1m (evicts 2)          -> 0 hits, 5 disk reads
    # Host Belady: 0m 1m 2m: 0 is next asked for at step 4, 1 at step 5 -> evicts 1; 0h; 1m -> 1 hit, 4 reads
    trace = sequence([0, 0, 1, 2, 0, 1])
    lru = replay_two_level(trace, "lru", 1, "lru", 2, expert_bytes=100)
    device = (lru.accesses, lru.device_hits, lru.device_misses, lru.link_loads, lru.link_bytes)
    assert device == (6, 1, 5, 5, 500)
    assert (lru.host_accesses, lru.host_hits, lru.host_misses, lru.disk_bytes) == (5, 0, 5, 500)
    belady = replay_two_level(trace, "lru", 1, "belady", 2, expert_bytes=100)
    assert (belady.host_accesses, belady.host_hits, belady.host_misses, belady.disk_bytes) == (5, 1, 4, 400)
    assert belady.host_hit_rate == pytest.approx(1 / 5) and belady.disk_bytes_per_token == pytest.approx(
        400 / 6
    )
    assert belady.device_hit_rate == pytest.approx(1 / 6)
    # K = 0: no slots, the tier sees every access: 0m 0h 1m 2m (evicts 0) 0m (evicts 1) 1m -> 1 hit, 5 reads;
    # Belady: 0m 0h 1m 2m (evicts 1, asked for after 0) 0h 1m -> 2 hits, 4 reads.
    none = replay_two_level(trace, "lru", 0, "lru", 2, expert_bytes=100)
    assert (none.device_policy, none.link_loads, none.link_bytes, none.device_hit_rate) == (None, 0, 0, None)
    assert (none.host_accesses, none.host_hits, none.host_misses) == (6, 1, 5)
    assert replay_two_level(trace, "lru", 0, "belady", 2).host_misses == 4
    assert replay_two_level(trace, "lru", 0, "belady", 2).disk_bytes is None  # no size known
    # LRFU and LFU count every access by default (as the engine's tier does): at K = 1 the device's hit on
    # 0 at step 1 makes them keep 0 when 2 arrives, and evict 1: 4 reads. Counting only the tier's requests
    # (0 1 2 0 1), 0 and 1 look alike; both evict 0 (LRFU: 0.81 < 1; LFU: the least recent of a tie): 5.
    for policy in ("lrfu", "lfu"):
        assert replay_two_level(trace, "lru", 1, policy, 2).host_misses == 4
        assert replay_two_level(trace, "lru", 1, policy, 2, counts="requests").host_misses == 5
    with pytest.raises(TraceError, match="host-tier counts 'hits'"):
        replay_two_level(trace, "lru", 1, "lrfu", 2, counts="hits")


def test_prefetches_are_requests_too_and_bytes_are_per_layer() -> None:
    # tests/test_trace.py's test_prefetch_by_hand: layer 0 (100 bytes) loads 0 and 1 once; layer 1 (1000
    # bytes) loads 0 and 1, then prefetches 2 and misses 3: 6 copies. A tier of every expert reads each
    # once: 2 x 100 + 4 x 1000 bytes from disk, as many as over the link.
    steps = [[[[0, 1]], [[0, 1]]], [[[0, 1]], [[2, 3]]], [[[0, 1]], [[2, 3]]]]
    guesses = {(1, 1): [2, 3], (2, 1): [0, 1]}
    trace = make_trace(steps, num_experts=4, guesses=guesses, expert_bytes=(100, 1000))
    result = replay_two_level(trace, "lru+prefetch", 3, "lrfu", 8)  # room for every expert
    assert (result.link_loads, result.link_bytes) == (6, 4200)
    assert (result.host_accesses, result.host_hits, result.host_misses, result.disk_bytes) == (6, 0, 6, 4200)
    as_json = result.as_dict()
    assert as_json["host_tier"]["disk_bytes_read"] == 4200 and as_json["device"]["loads"] == 6
    assert json.dumps(as_json)


def test_a_budget_in_gib_counts_slots_as_the_plan_and_the_engine_do() -> None:
    # Three layers of 4 experts, top-2; experts of 1, 2 and 1 MiB: a slot is the largest, 2 MiB.
    trace = make_trace([[[[0, 1]], [[1, 2]], [[2, 3]]]], num_experts=4, expert_bytes=(2**20, 2**21, 2**20))
    assert host_slots_for_budget(trace, 7.5 / 1024) == 3  # 7.5 MiB // 2 MiB
    assert host_slots_for_budget(trace, 1.0) == 12  # never more than every expert
    with pytest.raises(
        TraceError, match=r"--host-memory 0.003: holds 1 experts of 2\.0 MiB, and one layer.s step needs 2"
    ):
        host_slots_for_budget(trace, 0.003)
    with pytest.raises(TraceError, match="--expert-bytes"):
        host_slots_for_budget(make_trace([[[[0]]]], num_experts=4), 1.0)


def test_bad_arguments_are_trace_errors() -> None:
    trace = sequence([0, 1])
    for args, message in (
        (("fifo", 1, "lru", 2), "unknown cache policy"),
        (("lru", 1, "fifo", 2), "unknown host-tier policy"),
        (("lru", 5, "lru", 2), "from 0 to 4"),
        (("lru", 1, "lru", 0), "host slots must be a whole number from 1 to 4"),
        (("lru", 1, "lru", 5), "from 1 to 4"),
    ):
        with pytest.raises(TraceError, match=message):
            replay_two_level(trace, *args)


def _pairs(experts: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, experts - 1), min_size=2, max_size=2, unique=True)


@settings(max_examples=120, deadline=None)
@given(
    st.integers(3, 5).flatmap(
        lambda experts: st.tuples(
            st.just(experts),
            st.lists(st.tuples(_pairs(experts), _pairs(experts)), min_size=1, max_size=10),
            st.integers(0, experts),
            st.integers(2, 2 * experts),
            st.sampled_from(["lru", "lrfu"]),
        )
    )
)
def test_belady_is_the_host_level_optimum(
    case: tuple[int, list[tuple[list[int], list[int]]], int, int, str],
) -> None:
    """Two layers sharing the pool, one token a step (so no step asks for more than top-2 <= S): Belady reads
    the fewest, exactly the optimum found by trying every eviction on the device's requests in time order."""
    experts, tokens, k, slots, device_policy = case
    trace = make_trace([[[first], [second]] for first, second in tokens], experts)
    reads = {
        p: replay_two_level(trace, device_policy, k, p, slots).host_misses
        for p in ("cyclic", "lru", "lrfu", "lfu", "belady")
    }
    assert all(reads["belady"] <= n for n in reads.values())
    requests = []
    for layer in range(2):
        if k:
            loads: list[list[int]] = []
            replay_layer(trace.needed_by_layer[layer], None, device_policy, k, experts, loads)
            requests.append(loads)
        else:
            requests.append(trace.needed_by_layer[layer])
    steps = tuple(
        frozenset((layer, e) for e in requests[layer][step])
        for step in range(trace.steps)
        for layer in range(2)
    )
    belady = replay_two_level(trace, device_policy, k, "belady", slots)
    assert belady.host_hits == optimum_hits(steps, slots)
    assert belady.host_accesses == sum(map(len, steps))


# Through the CLI.


def test_cli_two_level_replay(cli, tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    save_trace(sequence([0, 0, 1, 2, 0, 1]), path)
    args = [
        "trace",
        "replay",
        str(path),
        "-k",
        "0,1",
        "--policy",
        "lru",
        "--host-experts",
        "2",
        "--expert-bytes",
        "100",
    ]
    shown = CliRunner().invoke(cli, [*args, "--json"])
    assert shown.exit_code == 0, shown.output
    rows = json.loads(shown.output)["rows"]
    found = [
        (r["device"]["experts_per_layer"], r["host_tier"]["policy"], r["host_tier"]["misses"]) for r in rows
    ]
    # K = 0: LRFU and LFU keep 0 (used twice) when 2 arrives and evict 1, so they read as few as Belady.
    # K = 1: the tier is asked for 0 1 2 0 1, but LRFU and LFU count every access (0 twice at steps 0 and
    # 1, a device hit), so they too keep 0 when 2 arrives; LRU sees only the requests and evicts 0.
    # Cyclic counts requests only: 4 reads at K = 0, where requests are every access, and 5 at K = 1, as
    # LRU (tests/test_host_policy.py); adaptive (the default) follows cyclic while its shadows tie.
    assert found == [
        (0, "adaptive", 4), (0, "cyclic", 4), (0, "lru", 5), (0, "lrfu", 4), (0, "lfu", 4), (0, "belady", 4),
        (1, "adaptive", 5), (1, "cyclic", 5), (1, "lru", 5), (1, "lrfu", 4), (1, "lfu", 4), (1, "belady", 4),
    ]  # fmt: skip
    assert rows[-1]["host_tier"]["disk_bytes_read"] == 400 and rows[-1]["device"]["bytes_moved"] == 500
    table = CliRunner().invoke(cli, [*args, "--host-policy", "lru"], env={"COLUMNS": "160"})
    assert table.exit_code == 0, table.output
    assert "optimum" in table.output and "1.25x" in table.output  # LRU's 5 reads against Belady's 4
    budget = CliRunner().invoke(
        cli, [*args[:-4], "--expert-bytes", "1048576", "--host-memory", "0.002", "--json"]
    )
    assert budget.exit_code == 0, budget.output
    assert json.loads(budget.output)["rows"][0]["host_tier"]["slots"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host-experts", "5"], "more than the trace's 4 experts"),
        (["--host-experts", "2", "--host-memory", "1"], "not both"),
        (["--host-memory", "0"], "--host-memory 0.0 is out of range"),
        (["--host-policy", "lru"], "needs the host tier's size"),
        (["--host-experts", "2", "--host-policy", "mru"], "'mru' is not a host-tier policy"),
        (["--host-experts", "2", "--host-policy", "lru,"], "'lru,' has an empty name"),
        (["--host-experts", "2", "-k", "5"], "out of range"),
    ],
)
def test_cli_two_level_rejects_bad_options(cli, tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "t.trace"
    save_trace(sequence([0, 1]), path)
    result = CliRunner().invoke(cli, ["trace", "replay", str(path), *args], env={"COLUMNS": "300"})
    if isinstance(result.exception, OffloadError):  # cli.main.run prints it as one line, exit code 2
        assert message in str(result.exception)
    else:
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())


def test_cli_host_memory_without_sizes_is_a_trace_error(cli, tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    save_trace(sequence([0, 1]), path)
    result = CliRunner().invoke(cli, ["trace", "replay", str(path), "--host-memory", "1"])
    assert isinstance(result.exception, TraceError) and "--expert-bytes" in str(result.exception)


def test_lrfu_with_a_decay_of_its_own() -> None:
    # K = 0, H = 2, uses 0 0 0 1 2 1 2 1 2 (tests/test_trace.py's hot expert gone cold). With decay 0.9,
    # 0's count (2.71 after three uses) falls below 1's and 2's within three steps: 3 hits at the device's
    # replay of the same sequence. With decay 0.99 it hardly fades: 1 and 2 take turns in the other slot,
    # each evicting the other: hits are 0's two repeats only.
    trace = sequence([0, 0, 0, 1, 2, 1, 2, 1, 2])
    assert replay_two_level(trace, "lru", 0, "lrfu:0.9", 2).host_hits == 3
    assert replay_two_level(trace, "lru", 0, "lrfu", 2) == replace(
        replay_two_level(trace, "lru", 0, "lrfu:0.9", 2), host_policy="lrfu"
    )
    assert replay_two_level(trace, "lru", 0, "lrfu:0.99", 2).host_hits == 2
    for bad in ("lrfu:1", "lrfu:0", "lrfu:x", "lru:0.5", "lrfu:"):
        with pytest.raises(TraceError, match="lrfu:D"):
            replay_two_level(trace, "lru", 0, bad, 2)
