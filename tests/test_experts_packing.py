"""Packing an expert into one buffer, and the host store built from packed experts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.errors import CacheError, OffloadError
from offload.experts.packing import ALIGNMENT, ExpertLayout, materialize_dense, pack_expert, unpack_expert
from offload.experts.source import DenseExpert
from offload.experts.store import HostStore

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int8, torch.int32, torch.int64]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random bits of any dtype, NaNs included: packing must move bytes, not values."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def dense_tensors(hidden: int, width: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(width, hidden, generator=generator).to(dtype),
        "w2": torch.randn(hidden, width, generator=generator).to(dtype),
        "w3": torch.randn(width, hidden, generator=generator).to(dtype),
    }


tensor_specs = st.lists(
    st.tuples(st.lists(st.integers(0, 7), min_size=0, max_size=3), st.sampled_from(DTYPES)),
    min_size=1,
    max_size=5,
)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(specs=tensor_specs)
def test_pack_unpack_round_trips_bits_with_aligned_offsets(specs):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"t{i}": random_tensor(tuple(shape), dtype, generator) for i, (shape, dtype) in enumerate(specs)
    }
    layout = ExpertLayout.of(tensors)
    buffer = pack_expert(tensors, layout)

    assert buffer.dtype == torch.uint8 and buffer.shape == (layout.nbytes,)
    assert layout.nbytes % ALIGNMENT == 0
    assert [s.name for s in layout.slices] == list(tensors)
    for piece in layout.slices:
        assert piece.offset % ALIGNMENT == 0
        assert piece.offset + piece.nbytes <= layout.nbytes
    views = unpack_expert(buffer, layout)
    assert list(views) == list(tensors)
    for name, tensor in tensors.items():
        assert same_bits(views[name], tensor)


def test_unpacked_views_share_the_buffer():
    tensors = {"w": torch.zeros(3, 5), "scale": torch.zeros(7, dtype=torch.float16)}
    layout = ExpertLayout.of(tensors)
    buffer = pack_expert(tensors, layout)
    views = unpack_expert(buffer, layout)
    views["scale"].fill_(1.0)
    assert buffer.untyped_storage().data_ptr() == views["scale"].untyped_storage().data_ptr()
    assert unpack_expert(buffer, layout)["scale"].eq(1.0).all()
    # row-major, or input-major where our float32 kernel runs (``input_major_shape``): one dense block either way
    dense_block = views["w"].is_contiguous() or views["w"].t().is_contiguous()
    assert dense_block and views["w"].data_ptr() % ALIGNMENT == buffer.data_ptr() % ALIGNMENT


def test_pack_into_a_slice_of_a_larger_buffer():
    tensors = dense_tensors(8, 12, torch.bfloat16, seed=1)
    layout = ExpertLayout.of(tensors)
    big = torch.zeros(3 * layout.nbytes, dtype=torch.uint8)
    pack_expert(tensors, layout, out=big[layout.nbytes : 2 * layout.nbytes])
    assert big[: layout.nbytes].eq(0).all() and big[2 * layout.nbytes :].eq(0).all()
    views = unpack_expert(big[layout.nbytes : 2 * layout.nbytes], layout)
    for name, tensor in tensors.items():
        assert same_bits(views[name], tensor)


def test_non_contiguous_sources_pack_by_value():
    source = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"w": source.t()}
    layout = ExpertLayout.of(tensors)
    assert torch.equal(unpack_expert(pack_expert(tensors, layout), layout)["w"], source.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_materialized_dense_expert_computes_bit_identically(dtype):
    tensors = dense_tensors(16, 40, dtype, seed=2)
    layout = ExpertLayout.of(tensors)
    packed = materialize_dense(unpack_expert(pack_expert(tensors, layout), layout))
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert same_bits(packed(x), DenseExpert(tensors["w1"], tensors["w2"], tensors["w3"])(x))


@pytest.mark.parametrize(
    "change",
    [
        lambda t: {**t, "w1": t["w1"][:-1]},
        lambda t: {**t, "w2": t["w2"].double()},
        lambda t: {k: v for k, v in t.items() if k != "w3"},
        lambda t: {**t, "extra": torch.zeros(1)},
    ],
    ids=["shape", "dtype", "missing", "extra"],
)
def test_pack_rejects_tensors_of_another_layout(change):
    tensors = dense_tensors(4, 6, torch.float32, seed=0)
    layout = ExpertLayout.of(tensors)
    with pytest.raises(CacheError, match="do not match the layer's layout") as raised:
        pack_expert(change(tensors), layout)
    assert "\n" not in str(raised.value)


def test_store_packs_every_expert_into_one_buffer_per_layer():
    # Mixed-bit experts: layer 1 has another layout (here, another dtype) than layer 0.
    store = HostStore(num_layers=2, num_experts=3)
    originals = {}
    for layer, dtype in enumerate([torch.float32, torch.bfloat16]):
        for expert in range(3):
            originals[layer, expert] = dense_tensors(8, 16, dtype, seed=10 * layer + expert)
            store.put(layer, expert, {k: v.clone() for k, v in originals[layer, expert].items()})
    store.check_complete()

    assert store.layout(0) != store.layout(1)
    assert store.nbytes == 3 * store.layout(0).nbytes + 3 * store.layout(1).nbytes
    for (layer, expert), tensors in originals.items():
        buffer = store.buffer(layer, expert)
        assert buffer.shape == (store.layout(layer).nbytes,) and buffer.is_contiguous()
        for name, view in store.tensors(layer, expert).items():
            assert same_bits(view, tensors[name])
    # Buffers of one layer sit back to back in one allocation.
    first, second = store.buffer(0, 0), store.buffer(0, 1)
    assert second.data_ptr() - first.data_ptr() == store.layout(0).nbytes
    assert not store.pinned


def test_store_errors_name_the_expert():
    store = HostStore(num_layers=2, num_experts=2)
    store.put(0, 0, dense_tensors(4, 8, torch.float32, seed=0))
    with pytest.raises(CacheError, match="layer 0 expert 1"):
        store.put(0, 1, dense_tensors(4, 9, torch.float32, seed=0))
    with pytest.raises(CacheError, match="layer 0 expert 1 was never put"):
        store.check_complete()
    with pytest.raises(CacheError, match="layer 1 has no experts"):
        store.layout(1)
    with pytest.raises(OffloadError, match=r"no expert \(2, 0\)"):
        store.put(2, 0, dense_tensors(4, 8, torch.float32, seed=0))
    with pytest.raises(CacheError, match="one layer and one expert or more"):
        HostStore(num_layers=0, num_experts=2)
