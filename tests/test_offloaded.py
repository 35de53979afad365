"""OffloadedExperts must give bit-identical outputs to ResidentExperts, whatever the cache and prefetch.

A small fake MoE loop drives both sources exactly as the model's MoE block does: one host sync
per layer, experts written into fixed (token, slot) places so the processing order cannot change
the sum.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from offload.errors import CacheError
from offload.experts.cache import ExpertCache
from offload.experts.link import EmulatedLink, Link, LocalLink
from offload.experts.offloaded import OffloadedExperts
from offload.experts.packing import materialize_dense
from offload.experts.source import DenseExpert, ExpertMemory, ExpertSource, ResidentExperts, route
from offload.experts.store import HostStore

HIDDEN, WIDTH, NUM_EXPERTS, TOP_K, NUM_LAYERS = 16, 24, 4, 2, 3


class FakeMoE:
    """Random gates and dense experts for NUM_LAYERS MoE layers, in ``dtype``."""

    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.gates = []
        for _ in range(NUM_LAYERS):
            gate = nn.Linear(HIDDEN, NUM_EXPERTS, bias=False, dtype=dtype)
            gate.weight.data = torch.randn(NUM_EXPERTS, HIDDEN, generator=generator).to(dtype)
            self.gates.append(gate)
        self.tensors = [
            [
                {
                    "w1": (torch.randn(WIDTH, HIDDEN, generator=generator) / HIDDEN**0.5).to(dtype),
                    "w2": (torch.randn(HIDDEN, WIDTH, generator=generator) / WIDTH**0.5).to(dtype),
                    "w3": (torch.randn(WIDTH, HIDDEN, generator=generator) / HIDDEN**0.5).to(dtype),
                }
                for _ in range(NUM_EXPERTS)
            ]
            for _ in range(NUM_LAYERS)
        ]

    def resident(self) -> ResidentExperts:
        return ResidentExperts(
            [[DenseExpert(t["w1"], t["w2"], t["w3"]) for t in layer] for layer in self.tensors]
        )

    def offloaded(self, experts_per_layer: int | list[int], prefetch: int, link: Link) -> OffloadedExperts:
        store = HostStore(NUM_LAYERS, NUM_EXPERTS)
        for layer, experts in enumerate(self.tensors):
            for expert, tensors in enumerate(experts):
                store.put(layer, expert, {name: t.clone() for name, t in tensors.items()})
        cache = ExpertCache(store, experts_per_layer, link, materialize_dense)
        return OffloadedExperts(cache, self.gates, prefetch)

    def forward(self, source: ExpertSource, x: torch.Tensor, on_layer=None) -> torch.Tensor:
        """x (T, D) through every MoE layer; ``on_layer(layer, needed, yielded)`` sees each layer."""
        tokens = x.shape[0]
        for layer in range(NUM_LAYERS):
            h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype)
            weights, ids = route(self.gates[layer](h), TOP_K)  # (T, k)
            guesses = source.speculate(layer, h)
            host = ids.flatten().tolist() if guesses is None else torch.cat([ids.flatten(), guesses]).tolist()
            needed, guess_list = sorted(set(host[: tokens * TOP_K])), host[tokens * TOP_K :]
            out = torch.zeros(tokens, TOP_K, HIDDEN, dtype=x.dtype)
            yielded = []
            for expert_id, expert in source.experts_for(layer, needed, guess_list):
                yielded.append(expert_id)
                token, slot = (ids == expert_id).nonzero(as_tuple=True)
                out[token, slot] = (expert(h[token]) * weights[token, slot, None]).to(x.dtype)
            if on_layer is not None:
                on_layer(layer, needed, yielded)
            x = x + out.sum(1)
        return x


def inputs(tokens: int, steps: int, dtype: torch.dtype, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, HIDDEN, generator=generator).to(dtype) for _ in range(steps)]


def watch_evictions(source: OffloadedExperts) -> dict[int, set[int]]:
    """Fail if any load evicts a protected expert or a needed expert of the layer not yet computed."""
    uncomputed: dict[int, set[int]] = {}
    cache, load = source.cache, source.cache.load

    def checked_load(layer, expert, protected=(), prefetch=False):
        before = set(cache.resident(layer))
        loaded = load(layer, expert, protected=protected, prefetch=prefetch)
        evicted = before - set(cache.resident(layer))
        assert not evicted & set(protected), f"layer {layer}: evicted protected {evicted}"
        assert not evicted & uncomputed.get(layer, set()), f"layer {layer}: evicted a needed expert {evicted}"
        return loaded

    cache.load = checked_load
    return uncomputed


def run_both(moe, source, xs, check=True):
    """Outputs of the resident reference and of ``source``, checking the offloaded bookkeeping."""
    uncomputed = watch_evictions(source) if check else {}
    expected, got = [], []
    for x in xs:
        expected.append(moe.forward(moe.resident(), x))

        def on_layer(layer, needed, yielded):
            assert sorted(yielded) == needed, "every needed expert is yielded exactly once"

        # Track which experts of a layer are still uncomputed while its generator runs.
        real_experts_for = source.experts_for

        def tracked(layer, needed, guesses, real=real_experts_for):
            uncomputed[layer] = set(needed)
            for expert_id, expert in real(layer, needed, guesses):
                yield expert_id, expert
                uncomputed[layer].discard(expert_id)

        source.experts_for = tracked
        got.append(moe.forward(source, x, on_layer))
        source.experts_for = real_experts_for
    return expected, got


def assert_stats_add_up(source: OffloadedExperts, steps: int, tokens: int) -> None:
    for layer, stats in enumerate(source.stats.layers):
        assert stats.hits + stats.misses == stats.accesses >= steps
        assert stats.bytes_moved == stats.loads * source.cache.store.layout(layer).nbytes
        assert stats.loads >= stats.misses
        assert stats.prefetch_hits + stats.wasted_prefetches <= stats.prefetch_loads
        assert len(source.cache.resident(layer)) <= source.cache.experts_per_layer[layer]
    summary = source.stats.as_dict()
    assert summary["accesses"] == summary["hits"] + summary["misses"]
    assert len(summary["layers"]) == NUM_LAYERS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("link_kind", ["local", "emulated"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("experts_per_layer", [1, 2, NUM_EXPERTS - 1, NUM_EXPERTS])
def test_offloaded_is_bit_identical_to_resident(experts_per_layer, prefetch, link_kind, dtype):
    moe = FakeMoE(dtype)
    link = LocalLink() if link_kind == "local" else EmulatedLink(gbps=50.0)
    with link:
        source = moe.offloaded(experts_per_layer, prefetch, link)
        for tokens in (1, 5):  # decode, then a prefill whose layers need more experts than slots
            xs = inputs(tokens, steps=4, dtype=dtype, seed=tokens)
            expected, got = run_both(moe, source, xs)
            for reference, offloaded in zip(expected, got, strict=True):
                assert torch.equal(reference, offloaded)
    assert_stats_add_up(source, steps=8, tokens=5)
    if experts_per_layer == NUM_EXPERTS:
        assert source.stats.total().misses <= NUM_LAYERS * NUM_EXPERTS  # each expert loads at most once


@settings(derandomize=True, max_examples=15, deadline=None)
@given(
    experts_per_layer=st.lists(st.integers(1, NUM_EXPERTS), min_size=NUM_LAYERS, max_size=NUM_LAYERS),
    prefetch=st.integers(0, NUM_EXPERTS + 1),
    tokens=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_offloaded_is_bit_identical_with_per_layer_slots(experts_per_layer, prefetch, tokens, seed):
    moe = FakeMoE(torch.float32, seed=seed)
    source = moe.offloaded(experts_per_layer, prefetch, LocalLink())
    expected, got = run_both(moe, source, inputs(tokens, steps=3, dtype=torch.float32, seed=seed))
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert_stats_add_up(source, steps=3, tokens=tokens)


def test_perfect_guesses_turn_every_later_layer_into_hits():
    # Same gate everywhere and no residual update: layer l+1 routes exactly as guessed at layer l.
    moe = FakeMoE(torch.float32)
    moe.gates = [moe.gates[0]] * NUM_LAYERS
    # Slots for every expert: no guess ever has to wait for a slot (see the guard test below).
    source = moe.offloaded(NUM_EXPERTS, prefetch=TOP_K, link=LocalLink())
    for x in inputs(1, steps=5, dtype=torch.float32):
        for layer in range(NUM_LAYERS):
            _, ids = route(moe.gates[layer](x), TOP_K)
            guesses = source.speculate(layer, x)
            needed = sorted(ids.flatten().tolist())
            for _ in source.experts_for(layer, needed, [] if guesses is None else guesses.tolist()):
                pass
    summary = source.stats.as_dict()
    layers = summary["layers"]
    assert [layer["prefetch_recall"] for layer in layers] == [None, 1.0, 1.0]
    assert [layer["prefetch_precision"] for layer in layers] == [None, 1.0, 1.0]
    assert [layer["misses"] for layer in layers[1:]] == [0, 0]
    assert summary["prefetch_hits"] > 0 and summary["wasted_prefetches"] == 0
    source.reset_stats()
    assert source.stats.as_dict()["accesses"] == 0


def test_a_guess_never_evicts_what_the_layer_used_last():
    moe = FakeMoE(torch.float32)
    source = moe.offloaded(3, prefetch=2, link=LocalLink())

    def step(layer, needed, guesses=()):
        for _ in source.experts_for(layer, needed, list(guesses)):
            pass

    step(1, [2])
    step(1, [0, 1])  # layer 1 holds 2, 0, 1 and used 0 and 1 last
    step(0, [0], guesses=[3, 2])  # 3 could only evict 0 or 1: skipped, and the batch stops
    assert source.cache.resident(1) == [2, 0, 1]
    assert source.stats.total().prefetch_loads == 0
    step(0, [0], guesses=[3])  # now 2 is neither a guess nor last used: it makes room
    assert sorted(source.cache.resident(1)) == [0, 1, 3]
    assert source.stats.layers[1].prefetch_loads == 1


def test_speculate_sums_probabilities_over_tokens_and_respects_slots():
    moe = FakeMoE(torch.float32)
    hidden = inputs(7, steps=1, dtype=torch.float32)[0]
    source = moe.offloaded([4, 4, 1], prefetch=3, link=LocalLink())
    guesses = source.speculate(0, hidden)
    probs = torch.softmax(moe.gates[1](hidden), dim=-1).sum(0)
    assert guesses.dtype == torch.int64 and guesses.device == hidden.device
    assert guesses.tolist() == torch.topk(probs, 3).indices.tolist()
    assert source.speculate(1, hidden).shape == (1,)  # layer 2 has a single slot
    assert source.speculate(NUM_LAYERS - 1, hidden) is None  # no next layer
    assert moe.offloaded(2, prefetch=0, link=LocalLink()).speculate(0, hidden) is None


def test_misses_are_submitted_before_the_next_layers_prefetches():
    moe = FakeMoE(torch.float32)
    source = moe.offloaded(2, prefetch=2, link=LocalLink())
    order = []
    load = source.cache.load

    def recording_load(layer, expert, protected=(), prefetch=False):
        order.append((layer, prefetch))
        return load(layer, expert, protected=protected, prefetch=prefetch)

    source.cache.load = recording_load
    for _ in source.experts_for(0, [0, 1], [2, 3]):
        pass
    assert order == [(0, False), (0, False), (1, True), (1, True)]


@pytest.mark.parametrize("prefetch", [-1, 1.5, True])
def test_bad_prefetch_is_one_clear_line(prefetch):
    moe = FakeMoE(torch.float32)
    with pytest.raises(CacheError, match="prefetch must be a whole number") as raised:
        moe.offloaded(2, prefetch=prefetch, link=LocalLink())
    assert "\n" not in str(raised.value)


def test_one_gate_per_layer():
    moe = FakeMoE(torch.float32)
    source = moe.offloaded(2, prefetch=1, link=LocalLink())
    with pytest.raises(CacheError, match="got 2 gates for a cache of 3 layers"):
        OffloadedExperts(source.cache, moe.gates[:2], prefetch=1)


def test_every_source_tells_its_counters_memory_and_sizes_without_being_probed():
    moe = FakeMoE(torch.float32)
    expert_bytes = 3 * WIDTH * HIDDEN * 4
    resident = moe.resident()
    assert resident.stats is None
    assert resident.memory() == ExpertMemory(
        device_bytes=NUM_LAYERS * NUM_EXPERTS * expert_bytes, host_bytes=0
    )
    assert resident.expert_bytes() == (expert_bytes,) * NUM_LAYERS
    assert resident.describe() == "every expert resident on the device"
    resident.reset_stats()
    resident.flush()  # nothing to do: every expert stays

    offloaded = moe.offloaded(2, prefetch=1, link=LocalLink())
    store = offloaded.cache.store
    assert offloaded.expert_bytes() == tuple(store.layout(layer).nbytes for layer in range(NUM_LAYERS))
    # Dense experts run on views of their slot: the device holds the slots and nothing more.
    assert offloaded.memory() == ExpertMemory(device_bytes=offloaded.cache.nbytes, host_bytes=store.nbytes)
    assert offloaded.describe().endswith(f"(K=2 of {NUM_EXPERTS} per layer, LRU, prefetch 1)")
    # More guesses than slots: a layer guesses at most K, and the description says so.
    assert (
        moe.offloaded(1, prefetch=2, link=LocalLink()).describe().endswith("prefetch 2, at most K a layer)")
    )
    moe.forward(offloaded, torch.randn(3, HIDDEN))
    assert offloaded.stats.total().accesses > 0
    offloaded.reset_stats()
    assert offloaded.stats.total().accesses == 0


def test_a_flushed_source_loads_every_expert_again():
    moe = FakeMoE(torch.float32)
    source = moe.offloaded(NUM_EXPERTS, prefetch=0, link=LocalLink())
    x = torch.randn(2, HIDDEN)
    moe.forward(source, x)
    source.reset_stats()
    moe.forward(source, x)
    assert source.stats.total().misses == 0  # every slot kept its expert
    source.flush()
    assert all(source.cache.resident(layer) == [] for layer in range(NUM_LAYERS))
    source.reset_stats()
    moe.forward(source, x)
    total = source.stats.total()
    assert total.misses == total.accesses > 0
