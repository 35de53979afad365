"""Device cache slots build a 4-bit expert in place: the slot holds one expert's bytes, in the kernel's layout.

On a CPU device the CPU int4 kernel's layout stands in for the CUDA one (both take the stored bytes' size); the
CUDA run of the same invariant is in tests/test_offload_equivalence.py's `cuda` cases and below.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offload.checkpoint.convert import convert_checkpoint
from offload.experts.cache import ExpertCache
from offload.experts.link import EmulatedLink, LocalLink
from offload.experts.source import DenseExpert, expert_tensors
from offload.experts.store import HostStore
from offload.loading import OffloadOptions, load_model
from offload.quant.codec import QuantizedExpert, codec_for
from offload.quant.scheme import QuantScheme
from offload.quant.spec import QuantSpec
from tests.baby import BabySpec, write_baby
from tests.test_offload_equivalence import run

HIDDEN, FFN, EXPERTS = 64, 128, 4


def _store(spec: str, device: str = "cpu") -> tuple[HostStore, object]:
    codec = codec_for(QuantSpec.parse(spec))
    store = HostStore(1, EXPERTS)
    generator = torch.Generator().manual_seed(1)
    for expert in range(EXPERTS):
        w1, w3 = (torch.randn(FFN, HIDDEN, generator=generator) for _ in range(2))
        store.put(0, expert, codec.encode(w1, torch.randn(HIDDEN, FFN, generator=generator), w3))
    return store, codec


def _cache(spec: str, link: object, device: str = "cpu") -> tuple[ExpertCache, HostStore, object]:
    store, codec = _store(spec)
    cache = ExpertCache(
        store, 1, link, lambda tensors: codec.materialize(tensors, torch.float32, device), device
    )
    return cache, store, codec


def _inside(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    return buffer.data_ptr() <= tensor.data_ptr() < buffer.data_ptr() + buffer.numel()


@pytest.mark.parametrize("spec", ["hqq:4:64", "bnb:int8"])
@pytest.mark.parametrize("link", [LocalLink, lambda: EmulatedLink(50.0)], ids=["local", "emulated"])
def test_one_slot_reused_for_each_expert_in_turn_builds_each_correctly(link, spec: str) -> None:  # type: ignore[no-untyped-def]
    cache, store, codec = _cache(spec, link())
    assert cache.built_bytes(0) == 0
    slot = cache._layers[0].slots[0].buffer  # the one slot: where the expert lives
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(2))
    for expert in (0, 1, 2, 3, 0, 2):
        if cache.contains(0, expert):
            continue
        assert cache.load(0, expert)
        built = cache.acquire(0, expert)
        assert isinstance(built, QuantizedExpert)
        # every tensor it computes from lies in the slot: the stored bytes were overwritten by the build
        assert all(_inside(tensor, slot) for tensor in expert_tensors(built))
        want = codec.materialize(store.tensors(0, expert), torch.float32, "cpu")(x)
        assert torch.equal(built(x), want), expert
    cache.link.close()


def test_an_in_place_slot_adds_no_built_bytes_and_a_dense_one_keeps_them() -> None:
    int4, _, _ = _cache("hqq:4:64", LocalLink())
    assert int4.built_bytes(0) == 0  # was 3 repacked matrices beside the stored bytes
    three, store, codec = _cache("hqq:3:64", LocalLink())  # no CPU kernel: dequantized to float, as before
    assert three.built_bytes(0) == 3 * HIDDEN * FFN * 4
    x = torch.randn(2, HIDDEN)
    assert three.load(0, 1)
    built = three.acquire(0, 1)
    assert isinstance(built, DenseExpert)
    assert torch.equal(built(x), codec.materialize(store.tensors(0, 1), torch.float32, "cpu")(x))


@pytest.fixture(scope="module")
def int4_baby(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("in-place-src")
    spec = BabySpec(
        "in-place",
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_local_experts=EXPERTS,
        seed=6,
    )
    write_baby(spec, source)
    out = tmp_path_factory.mktemp("in-place") / "converted"
    convert_checkpoint(source, out, QuantScheme.build(2, attention="hqq:4:64", experts="hqq:4:64"))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_offloaded_int4_experts_built_in_their_slots_equal_resident(int4_baby: Path, dtype: str) -> None:
    resident = load_model(int4_baby, dtype=dtype)
    prompt = list(range(3, 13))
    want_logits, want_tokens = run(resident, prompt)
    for slots in (1, 3):
        options = OffloadOptions(experts_per_layer=slots, prefetch=1, link="emulated:50:5")
        offloaded = load_model(int4_baby, dtype=dtype, offload=options)
        logits, tokens = run(offloaded, prompt)
        assert torch.equal(logits, want_logits) and tokens == want_tokens, slots
        source = offloaded.expert_source
        assert source.memory().device_bytes == source.cache.nbytes  # the slots, nothing built beside them
        assert source.stats.as_dict()["misses"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("link", ["cuda", "local"])
def test_cuda_offloaded_int4_experts_equal_resident_bit_for_bit(int4_baby: Path, link: str) -> None:
    from offload.quant.device_kernels import CudaInt4Linear

    resident = load_model(int4_baby, dtype="bfloat16", device="cuda")
    assert isinstance(resident.expert_source.experts[0][0].w2, CudaInt4Linear)  # the kernel, not HQQLinear
    prompt = list(range(3, 13))
    want_logits, want_tokens = run(resident, prompt)
    for slots in (1, 3):
        options = OffloadOptions(experts_per_layer=slots, prefetch=1, link=link)
        offloaded = load_model(int4_baby, dtype="bfloat16", device="cuda", offload=options)
        logits, tokens = run(offloaded, prompt)
        assert torch.equal(logits, want_logits) and tokens == want_tokens, slots
        source = offloaded.expert_source
        assert source.memory().device_bytes == source.cache.nbytes  # built in the slots
