"""The device tier: slots per layer, LRU eviction, protected experts, and the stats."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.errors import CacheError
from offload.experts.cache import ExpertCache
from offload.experts.link import EmulatedLink, LocalLink
from offload.experts.packing import materialize_dense
from offload.experts.stats import CacheStats, LayerStats
from offload.experts.store import HostStore

NUM_EXPERTS = 6


def make_store(
    num_layers: int = 1, num_experts: int = NUM_EXPERTS, hidden: int = 4, width: int = 8
) -> HostStore:
    store = HostStore(num_layers, num_experts)
    generator = torch.Generator().manual_seed(0)
    for layer in range(num_layers):
        for expert in range(num_experts):
            store.put(
                layer,
                expert,
                {
                    "w1": torch.randn(width, hidden, generator=generator),
                    "w2": torch.randn(hidden, width, generator=generator),
                    "w3": torch.randn(width, hidden, generator=generator),
                },
            )
    return store


class ReferenceLRU:
    """The simplest LRU with protected experts: what the cache must do, one list per layer."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.order: list[int] = []  # least recently used first
        self.unused_prefetches: set[int] = set()
        self.prefetch_hits = 0
        self.wasted_prefetches = 0

    def load(self, expert: int, protected: set[int], prefetch: bool) -> int | bool | None:
        """Returns the evicted expert, None when a slot was free, False when nothing may be evicted."""
        evicted = None
        if len(self.order) == self.slots:
            evicted = next((e for e in self.order if e not in protected), False)
            if evicted is False:
                return False
            self.order.remove(evicted)
            if evicted in self.unused_prefetches:
                self.unused_prefetches.discard(evicted)
                self.wasted_prefetches += 1
        self.order.append(expert)
        if prefetch:
            self.unused_prefetches.add(expert)
        return evicted

    def use(self, expert: int) -> None:
        self.order.remove(expert)
        self.order.append(expert)
        if expert in self.unused_prefetches:
            self.unused_prefetches.discard(expert)
            self.prefetch_hits += 1


operations = st.lists(
    st.one_of(
        st.tuples(st.just("use"), st.integers(0, NUM_EXPERTS - 1), st.just(frozenset())),
        st.tuples(
            st.just("prefetch"),
            st.integers(0, NUM_EXPERTS - 1),
            st.frozensets(st.integers(0, NUM_EXPERTS - 1), max_size=NUM_EXPERTS),
        ),
    ),
    max_size=40,
)


@pytest.mark.parametrize("link_kind", ["local", "emulated"])
@settings(derandomize=True, max_examples=40, deadline=None)
@given(slots=st.integers(1, NUM_EXPERTS), ops=operations)
def test_cache_matches_a_reference_lru(link_kind, slots, ops):
    store = make_store()
    link = LocalLink() if link_kind == "local" else EmulatedLink(gbps=50.0)
    cache = ExpertCache(store, slots, link, materialize_dense)
    reference = ReferenceLRU(slots)
    expert_bytes = store.layout(0).nbytes
    try:
        for kind, expert, protected in ops:
            if kind == "use":
                hit = cache.lookup(0, expert)
                assert hit == (expert in reference.order)
                if not hit:
                    assert cache.load(0, expert, protected={expert})
                    reference.load(expert, {expert}, prefetch=False)
                weights = cache.acquire(0, expert)
                reference.use(expert)
                # The right bytes arrived, even when the slot's previous copy was still in flight.
                assert torch.equal(weights.w1, store.tensors(0, expert)["w1"])
            elif not cache.contains(0, expert):
                before = set(cache.resident(0))
                loaded = cache.load(0, expert, protected=protected | {expert}, prefetch=True)
                expected = reference.load(expert, protected | {expert}, prefetch=True)
                assert loaded == (expected is not False)
                assert not (protected & (before - set(cache.resident(0)))), "a protected expert was evicted"
            assert cache.resident(0) == reference.order
            assert len(cache.resident(0)) <= slots

        stats = cache.stats.layers[0]
        assert stats.hits + stats.misses == stats.accesses == sum(kind == "use" for kind, _, _ in ops)
        assert stats.bytes_moved == stats.loads * expert_bytes
        assert stats.loads == stats.misses + stats.prefetch_loads
        assert (stats.prefetch_hits, stats.wasted_prefetches) == (
            reference.prefetch_hits,
            reference.wasted_prefetches,
        )
    finally:
        link.close()


def test_prefetch_hits_and_wasted_prefetches():
    cache = ExpertCache(make_store(), 2, LocalLink(), materialize_dense)
    assert cache.load(0, 0, prefetch=True) and cache.load(0, 1, prefetch=True)
    assert cache.lookup(0, 0)
    cache.acquire(0, 0)  # a prefetch hit
    cache.acquire(0, 0)  # used again: still one prefetch hit
    assert cache.load(0, 2, protected={2})  # evicts 1, the least recently used, never used: wasted
    stats = cache.stats.layers[0]
    assert (stats.prefetch_hits, stats.wasted_prefetches, stats.loads, stats.prefetch_loads) == (1, 1, 3, 2)
    assert cache.resident(0) == [0, 2]
    assert not cache.load(0, 3, protected={0, 2}), "every slot is protected"
    assert cache.resident(0) == [0, 2]


def test_a_slow_copy_is_waited_for_and_counted():
    store = make_store(hidden=64, width=256)  # 192 KiB per expert: 2 ms at 0.1 GB/s
    with EmulatedLink(gbps=0.1) as link:
        cache = ExpertCache(store, 1, link, materialize_dense)
        cache.load(0, 3)
        expert = cache.acquire(0, 3)
        assert cache.is_ready(0, 3)
    assert torch.equal(expert.w2, store.tensors(0, 3)["w2"])
    assert cache.stats.layers[0].wait_seconds > 0
    assert cache.stats.layers[0].bytes_moved == store.layout(0).nbytes


def test_materialize_may_differ_per_layer():
    built = []

    def tagged(tag):
        def materialize(tensors):
            built.append(tag)
            return materialize_dense(tensors)

        return materialize

    cache = ExpertCache(make_store(num_layers=2), 1, LocalLink(), [tagged("a"), tagged("b")])
    for layer in (1, 0):
        cache.load(layer, 0)
        cache.acquire(layer, 0)
    assert built == ["b", "a"]
    with pytest.raises(CacheError, match="got 1 materialize functions for 2 layers"):
        ExpertCache(make_store(num_layers=2), 1, LocalLink(), [materialize_dense])


def test_slots_per_layer_may_differ():
    cache = ExpertCache(make_store(num_layers=2), [1, 3], LocalLink(), materialize_dense)
    assert cache.experts_per_layer == (1, 3)
    for expert in range(4):
        for layer in range(2):
            if not cache.contains(layer, expert):
                cache.load(layer, expert)
            cache.acquire(layer, expert)
    assert cache.resident(0) == [3] and cache.resident(1) == [1, 2, 3]
    assert cache.nbytes == 4 * make_store().layout(0).nbytes


@pytest.mark.parametrize(
    ("experts_per_layer", "message"),
    [
        (0, "from 1 to 6 .* got 0 for layer 0"),
        (7, "from 1 to 6 .* got 7 for layer 0"),
        ([2, 0], "got 0 for layer 1"),
        ([2, 2, 2], "lists 3 values but the model has 2 layers"),
        ([2], "lists 1 values"),
        (2.5, "got 2.5 for layer 0"),
        ([2, 1.5], "got 1.5 for layer 1"),
        (True, "got True"),
    ],
)
def test_bad_slot_counts_are_one_clear_line(experts_per_layer, message):
    with pytest.raises(CacheError, match=message) as raised:
        ExpertCache(make_store(num_layers=2), experts_per_layer, LocalLink(), materialize_dense)
    assert "\n" not in str(raised.value)


def test_stats_summary_is_json_ready():
    stats = CacheStats(num_layers=2)
    assert stats.as_dict()["hit_rate"] is None
    stats.layers[0] = LayerStats(accesses=4, hits=3, misses=1, loads=1, bytes_moved=100)
    stats.layers[1] = LayerStats(accesses=4, hits=1, misses=3, loads=3, bytes_moved=300)
    stats.layers[1].record_guesses(guessed=[1, 2], used=[2, 3, 4])
    summary = json.loads(json.dumps(stats.as_dict()))
    assert summary["accesses"] == 8 and summary["hit_rate"] == 0.5 and summary["bytes_moved"] == 400
    assert summary["prefetch_recall"] == pytest.approx(1 / 3) and summary["prefetch_precision"] == 0.5
    assert [layer["hit_rate"] for layer in summary["layers"]] == [0.75, 0.25]
    assert [layer["prefetch_recall"] for layer in summary["layers"]] == [None, pytest.approx(1 / 3)]
    assert summary["layers"][1]["bytes_moved"] == 300
    assert set(summary) >= {"misses", "prefetch_hits", "wasted_prefetches", "loads", "wait_seconds"}
    stats.reset()
    assert stats.total() == LayerStats()


@pytest.mark.parametrize(("policy", "evicted"), [("lru", 0), ("lrfu", 1)])
def test_the_policy_picks_the_victim(policy: str, evicted: int) -> None:
    cache = ExpertCache(make_store(), 2, LocalLink(), materialize_dense, policy=policy)
    for expert in (0, 1):
        cache.load(0, expert)
    for _ in range(3):
        cache.note_step(0, [0])  # 0 is used often...
    cache.touch(0, [0, 1])
    cache.note_step(0, [1])  # ...1 most recently: LRU evicts 0, LRFU evicts 1 (count 1 < 0's 2.44)
    assert cache.load(0, 2)
    assert sorted(cache.resident(0)) == sorted({0, 1, 2} - {evicted})


def test_an_unknown_policy_is_one_clear_line() -> None:
    with pytest.raises(CacheError, match=r"cache policy 'fifo' is not one of lrfu, lru"):
        ExpertCache(make_store(), 2, LocalLink(), materialize_dense, policy="fifo")


def test_the_victim_rule_is_the_engine_s_and_the_replay_s() -> None:
    from offload.experts.policy import choose_victim

    uses = [0.5, 2.0, 0.5, 1.0]
    assert choose_victim("lru", [3, 1, 0], uses) == 3  # the least recently used, whatever its count
    assert choose_victim("lrfu", [3, 1, 0], uses) == 0  # the smallest decayed count
    assert choose_victim("lrfu", [2, 0, 1], uses) == 2  # equal counts: the least recently used goes
