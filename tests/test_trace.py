"""Routing traces: the file format, the recorder, and cache-policy replay (hand-checked and against the cache)."""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from offload.errors import TraceError
from offload.trace.format import METADATA_KEY, Trace, load_trace, save_trace
from offload.trace.recorder import TraceRecorder
from offload.trace.replay import POLICIES, replay, replay_table
from tests.baby import BabySpec, write_baby


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


# --- the file ----------------------------------------------------------------------------------


def example() -> Trace:
    steps = [[[[0, 1], [2, 3]], [[1, 2], [0, 3]]], [[[0, 2]], [[1, 3]]]]
    return make_trace(steps, num_experts=4, guesses={(0, 1): [1, 0], (1, 1): [3]}, expert_bytes=(64, 128))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    trace = example()
    save_trace(trace, tmp_path / "t.trace")
    loaded = load_trace(tmp_path / "t.trace")
    assert loaded.header() == trace.header()
    for name in ("step_tokens", "ids", "weights", "guess_counts", "guesses"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(trace, name))
    assert loaded.needed(0, 1) == [0, 1, 2, 3] and loaded.guesses_for(0, 1) == [1, 0]
    assert loaded.guesses_for(1, 1) == [3] and loaded.guesses_for(1, 0) == []
    assert [p.name for p in tmp_path.iterdir()] == ["t.trace"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.trace"
    save_trace(sequence([0, 1]), path)
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(TraceError, match="No space left"):
        save_trace(example(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.trace"]  # no temporary file left behind
    with pytest.raises(TraceError, match="cannot write"):
        save_trace(example(), tmp_path / "missing" / "t.trace")


def rewrite(path: Path, change) -> None:
    """Apply ``change(tensors, header)`` to a saved trace, bypassing save_trace's checks."""
    from safetensors import safe_open
    from safetensors.numpy import save

    with safe_open(str(path), framework="numpy") as file:
        header = json.loads(file.metadata()[METADATA_KEY])
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    change(tensors, header)
    path.write_bytes(save(tensors, metadata={METADATA_KEY: json.dumps(header)}))


def _set(mapping: dict, key: str, value: object) -> None:
    mapping[key] = value


DAMAGE = {
    "format": (lambda t, h: _set(h, "format", "npz"), "format 'npz'"),
    "version": (lambda t, h: _set(h, "version", 2), "version 2 is not supported"),
    "top_k": (lambda t, h: _set(h, "top_k", 0), "top_k"),
    "expert bytes": (lambda t, h: _set(h, "expert_bytes", [64]), "expert_bytes has 1 values"),
    "id too large": (lambda t, h: t["ids"].__setitem__((0, 0, 0), 4), "out of range"),
    "negative id": (lambda t, h: t["ids"].__setitem__((0, 0, 0), -1), "out of range"),
    "guess id": (lambda t, h: t["guesses"].__setitem__(0, 9), "guessed expert id is out of range"),
    "repeated id": (lambda t, h: t["ids"].__setitem__((0, 0, 1), t["ids"][0, 0, 0]), "same expert twice"),
    "token count": (lambda t, h: t["step_tokens"].__setitem__(1, 2), "ids has shape"),
    "guess count": (lambda t, h: t["guess_counts"].__setitem__((1, 1), 2), "guess_counts add up to 4"),
    "layer 0 guess": (lambda t, h: t["guess_counts"].__setitem__((0, 0), 1), "guesses has shape"),
    "empty step": (lambda t, h: t["step_tokens"].__setitem__(0, 0), "a step has no tokens"),
    "weights": (lambda t, h: t["weights"].__setitem__((0, 0, 0), np.nan), "not finite"),
    "missing": (lambda t, h: t.pop("guesses"), "missing tensor 'guesses'"),
    "extra": (lambda t, h: _set(t, "logits", np.zeros(1, np.float32)), "unexpected tensor 'logits'"),
    "dtype": (lambda t, h: _set(t, "ids", t["ids"].astype(np.float32)), "'ids' is float32"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_invalid_trace_is_a_one_line_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "bad.trace"
    save_trace(example(), path)
    change, message = DAMAGE[damage]
    rewrite(path, change)
    with pytest.raises(TraceError) as raised:
        load_trace(path)
    text = str(raised.value)
    assert message in text and str(path) in text and "\n" not in text


def test_a_damaged_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    save_trace(example(), path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(TraceError, match="not a readable safetensors file"):
        load_trace(path)
    path.write_text("step,layer,expert\n0,0,1\n")
    with pytest.raises(TraceError, match="not a readable safetensors file"):
        load_trace(path)
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "none.trace")
    from safetensors.numpy import save

    path.write_bytes(save({"ids": np.zeros(1, np.int32)}))
    with pytest.raises(TraceError, match="not an offload routing trace"):
        load_trace(path)


# --- recording a model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baby(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three layers so guesses cross layers; Mixtral's tokenizer so the CLI can take text."""
    import mistral_common

    directory = tmp_path_factory.mktemp("trace-baby")
    write_baby(
        BabySpec("trace-baby", hidden_size=32, intermediate_size=48, num_hidden_layers=3, vocab_size=32000),
        directory,
    )
    shutil.copy(
        Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", directory / "tokenizer.model"
    )
    return directory


def load(directory: Path, experts_per_layer: int | None = None, prefetch: int = 0, policy: str = "lru"):
    from offload.loading import OffloadOptions, load_model

    options = OffloadOptions(experts_per_layer=experts_per_layer, prefetch=prefetch, cache_policy=policy)
    return load_model(directory, dtype="float32", offload=options)


def run(model, prompt: list[int], new_tokens: int) -> list[int]:
    from offload.generate import SamplingParams, generate_ids

    return generate_ids(
        model, prompt, max_new_tokens=new_tokens, sampling=SamplingParams(temperature=0), stop_ids=()
    )


@pytest.mark.parametrize(("experts_per_layer", "prefetch"), [(None, 0), (3, 2)])
def test_recording_leaves_the_logits_bit_identical(
    baby: Path, experts_per_layer: int | None, prefetch: int
) -> None:
    model = load(baby, experts_per_layer, prefetch)
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142]])
    source, gates = model.expert_source, [layer.block_sparse_moe.gate for layer in model.model.layers]
    with torch.inference_mode():
        before = model(ids)
        with TraceRecorder(model, model_name="baby") as recorder:
            during = model(ids)
        after = model(ids)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert all(layer.block_sparse_moe.source is source for layer in model.model.layers)
    assert not any(gate._forward_hooks for gate in gates) and not model._forward_hooks
    trace = recorder.trace()
    assert trace.steps == 1 and trace.tokens == 6 and trace.model == "baby"
    assert trace.has_guesses == (prefetch > 0)
    assert trace.guess_counts[0, 0] == 0 and (trace.guess_counts[0, 1:] == prefetch).all()
    assert np.allclose(trace.weights.sum(-1), 1)


SHARED_COUNTERS = (
    "accesses",
    "hits",
    "misses",
    "loads",
    "prefetch_loads",
    "prefetch_hits",
    "wasted_prefetches",
)


REPLAYED_RUNS = [(2, 0, [1]), (3, 2, [1]), (8, 2, [1, 415, 2936, 9060])]


@pytest.mark.parametrize("policy", ["lru", "lrfu"])
@pytest.mark.parametrize(("experts_per_layer", "prefetch", "prompt"), REPLAYED_RUNS)
def test_replay_reproduces_the_offloaded_cache(
    baby: Path, experts_per_layer: int, prefetch: int, prompt: list[int], policy: str
) -> None:
    """With no step needing more than K experts, replay gives OffloadedExperts' very counters."""
    model = load(baby, experts_per_layer, prefetch, policy)
    with TraceRecorder(model) as recorder:
        run(model, prompt, 40)
    trace = recorder.trace()
    assert list(trace.step_tokens) == [len(prompt)] + [1] * 39
    expected = model.expert_source.stats.total()
    result = replay(trace, f"{policy}+prefetch" if prefetch else policy, experts_per_layer)
    for name in SHARED_COUNTERS:
        assert getattr(result, name) == getattr(expected, name), name
    assert result.bytes_moved == expected.bytes_moved
    assert result.streamed == 0


def test_the_replayed_runs_tell_the_policies_apart(baby: Path) -> None:
    """The runs above would hide an engine that ignored its policy unless LRU and LRFU differ on them.
    (At K = top-k = 2 no policy has a choice: a miss can only evict the one expert not needed.)"""
    model = load(baby, 3, 2)
    with TraceRecorder(model) as recorder:
        run(model, [1], 40)
    trace = recorder.trace()
    assert replay(trace, "lru", 3).misses != replay(trace, "lrfu", 3).misses
    assert replay(trace, "lru+prefetch", 3).loads != replay(trace, "lrfu+prefetch", 3).loads


# --- the commands ------------------------------------------------------------------------------


@pytest.fixture
def cli() -> typer.Typer:
    from cli.trace_cmd import register

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A stand-in for the offload app."""

    register(app)
    return app


@pytest.mark.parametrize(
    ("flags", "guesses"),
    [([], True), (["--experts-per-layer", "4", "--prefetch", "1"], True), (["--prefetch", "0"], False)],
)
def test_record(cli: typer.Typer, baby: Path, tmp_path: Path, flags: list[str], guesses: bool) -> None:
    out = tmp_path / "baby.trace"
    args = ["trace", "record", str(out), "--model", str(baby), "--prompt", "Hello", "--max-new-tokens", "4"]
    recorded = CliRunner().invoke(cli, [*args, "--dtype", "float32", *flags])
    assert recorded.exit_code == 0, recorded.output
    assert f"wrote {out}: 4 steps" in recorded.output
    trace = load_trace(out)
    assert trace.has_guesses == guesses and trace.model == baby.name
    assert trace.expert_bytes == (3 * 32 * 48 * 4,) * 3  # w1, w2, w3 in float32


def test_record_then_replay(cli: typer.Typer, baby: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "baby.trace"
    recorded = runner.invoke(
        cli, ["trace", "record", str(out), "--model", str(baby), "--prompt", "Hello there", "--max-new-tokens", "6",
              "--experts-per-layer", "4", "--prefetch", "2", "--dtype", "float32"],
    )  # fmt: skip
    assert recorded.exit_code == 0, recorded.output
    trace = load_trace(out)
    assert trace.steps == 6 and trace.has_guesses

    table = runner.invoke(cli, ["trace", "replay", str(out), "-k", "1-2,4"])
    assert table.exit_code == 0, table.output
    assert "belady" in table.output and "lru+prefetch" in table.output and "optimum" in table.output

    as_json = runner.invoke(cli, ["trace", "replay", str(out), "--policy", "lru,belady", "-k", "2", "--json"])
    assert as_json.exit_code == 0, as_json.output
    result = json.loads(as_json.output)
    assert [(r["policy"], r["experts_per_layer"]) for r in result["rows"]] == [("lru", 2), ("belady", 2)]
    assert result["rows"][1]["hits"] >= result["rows"][0]["hits"]
    assert result["rows"][0]["bytes_per_token"] > 0  # the recorder knew the expert size


def test_replay_without_guesses_or_sizes(cli: typer.Typer, tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    save_trace(sequence([0, 1, 0, 2, 1, 2]), path)
    shown = CliRunner().invoke(cli, ["trace", "replay", str(path), "-k", "2"])
    assert shown.exit_code == 0, shown.output
    assert "lru+prefetch" not in shown.output.split("No prefetch")[0] and "--expert-bytes" in shown.output
    sized = CliRunner().invoke(
        cli, ["trace", "replay", str(path), "-k", "2", "--expert-bytes", "1048576", "--json"]
    )
    assert json.loads(sized.output)["rows"][0]["bytes_per_token"] == pytest.approx(4 * 2**20 / 6)


def test_replay_takes_the_issue_s_range_syntax(cli: typer.Typer, tmp_path: Path) -> None:
    """`--experts-per-layer 1..E`, as written in the issue, means the same as 1-E."""
    path = tmp_path / "t.trace"
    save_trace(sequence([0, 1, 0, 2, 1, 2]), path)
    rows = {}
    for ks in ("1..3", "1-3"):
        shown = CliRunner().invoke(
            cli, ["trace", "replay", str(path), "--policy", "lru", "--experts-per-layer", ks, "--json"]
        )
        assert shown.exit_code == 0, shown.output
        rows[ks] = json.loads(shown.output)["rows"]
    assert [r["experts_per_layer"] for r in rows["1..3"]] == [1, 2, 3]
    assert rows["1..3"] == rows["1-3"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "0"], "out of range"),
        (["-k", "2-9"], "out of range"),
        (["-k", "two"], "expected numbers"),
        (["--policy", "lru,fifo"], "'fifo' is not a policy"),
    ],
)
def test_replay_rejects_bad_options(cli: typer.Typer, tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "t.trace"
    save_trace(sequence([0, 1]), path)
    result = CliRunner().invoke(cli, ["trace", "replay", str(path), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_replay_of_a_damaged_file_raises_a_trace_error(cli: typer.Typer, tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    path.write_text("not a trace")
    result = CliRunner().invoke(cli, ["trace", "replay", str(path)])
    assert isinstance(result.exception, TraceError)  # cli.main.run prints it as one line, exit code 2
