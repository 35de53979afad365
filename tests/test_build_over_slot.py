"""A 4-bit expert built for the CPU int4 kernel in its slot is built straight over the stored bytes: each
matrix's packed codes over its stored codes, its (scale, offset) pairs over its scale and zero, with the same
bytes as a build from a copy, and nothing moved afterwards (docs/BENCHMARKS.md, "Repacking for the int4
kernel")."""

from __future__ import annotations

import pytest
import torch

from offload.experts.in_place import build_in_place
from offload.experts.packing import ExpertLayout, pack_expert, unpack_expert
from offload.experts.source import SlotTensors
from offload.quant.codec import MATRICES, QuantizedExpert, codec_for
from offload.quant.host_kernels import Int4Linear
from offload.quant.spec import QuantSpec


def _encoded(spec: QuantSpec, hidden: int, ffn: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    w1, w3 = (torch.randn(ffn, hidden, generator=generator) for _ in range(2))
    return codec_for(spec).encode(w1, torch.randn(hidden, ffn, generator=generator), w3)


# (hidden, ffn, spec): whole packing blocks; halves that are not whole blocks (packed the slow way); several
# scratch chunks.
SHAPES = [(64, 128, "hqq:4:64"), (96, 160, "hqq:4:32"), (256, 1024, "hqq:4:128")]


@pytest.mark.parametrize(("hidden", "ffn", "spec"), SHAPES)
def test_materialize_builds_each_matrix_over_its_stored_bytes(hidden: int, ffn: int, spec: str) -> None:
    quant = QuantSpec.parse(spec)
    codec = codec_for(quant)
    tensors = _encoded(quant, hidden, ffn)
    layout = ExpertLayout.of(tensors)
    buffer = pack_expert(tensors, layout)
    offsets = {piece.name: piece.offset for piece in layout.slices}
    want = codec.materialize(unpack_expert(buffer.clone(), layout), torch.float32, "cpu")

    # What build_in_place hands the codec: the slot's views, which the build may take over.
    built = codec.materialize(SlotTensors(unpack_expert(buffer, layout)), torch.float32, "cpu")

    assert isinstance(built, QuantizedExpert)
    for name in MATRICES:
        got, expected = getattr(built, name), getattr(want, name)
        assert isinstance(got, Int4Linear)
        assert got.packed.data_ptr() == buffer.data_ptr() + offsets[f"{name}.W_q"], name
        assert got.scales_and_offsets.data_ptr() == buffer.data_ptr() + offsets[f"{name}.scale"], name
        assert torch.equal(got.packed, expected.packed), name
        assert torch.equal(
            got.scales_and_offsets.view(torch.int16), expected.scales_and_offsets.view(torch.int16)
        )
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(4))
    assert torch.equal(built(x), want(x))


@pytest.mark.parametrize(("hidden", "ffn", "spec"), SHAPES[:2])
def test_an_expert_built_in_its_slot_computes_as_one_built_from_a_copy(
    hidden: int, ffn: int, spec: str
) -> None:
    quant = QuantSpec.parse(spec)
    codec = codec_for(quant)
    tensors = _encoded(quant, hidden, ffn)
    layout = ExpertLayout.of(tensors)
    buffer = pack_expert(tensors, layout)
    want = codec.materialize(tensors, torch.float32, "cpu")
    built = build_in_place(buffer, layout, lambda t: codec.materialize(t, torch.float32, "cpu"))
    assert built is not None
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(5))
    assert torch.equal(built(x), want(x))


def test_a_plain_dict_of_stored_tensors_is_never_overwritten() -> None:
    quant = QuantSpec.parse("hqq:4:64")
    tensors = _encoded(quant, 64, 128)
    layout = ExpertLayout.of(tensors)
    buffer = pack_expert(tensors, layout)
    before = buffer.clone()
    codec_for(quant).materialize(unpack_expert(buffer, layout), torch.float32, "cpu")
    assert torch.equal(buffer, before)


def test_an_expert_without_a_cpu_kernel_leaves_its_slot_untouched() -> None:
    quant = QuantSpec.parse("hqq:3:64")  # no CPU kernel: dequantized from the stored bytes
    tensors = _encoded(quant, 64, 128)
    layout = ExpertLayout.of(tensors)
    buffer = pack_expert(tensors, layout)
    before = buffer.clone()
    codec_for(quant).materialize(SlotTensors(unpack_expert(buffer, layout)), torch.float32, "cpu")
    assert torch.equal(buffer, before)


def test_a_build_outside_inference_mode_follows_one_inside_it_on_the_same_thread() -> None:
    """A decode step builds inside inference mode; the bench's memory report then builds a slot outside it. The
    thread's scratch must stay writable there (it was an inference tensor: a RuntimeError at real size)."""
    import threading

    quant = QuantSpec.parse("hqq:4:64")
    codec = codec_for(quant)
    tensors = _encoded(quant, 64, 128)
    layout = ExpertLayout.of(tensors)
    failures: list[BaseException] = []

    def build() -> None:
        buffer = pack_expert(tensors, layout)
        build_in_place(buffer, layout, lambda t: codec.materialize(t, torch.float32, "cpu"))

    def on_a_fresh_thread() -> None:  # a new thread: its scratch is first made in inference mode
        try:
            with torch.inference_mode():
                build()
            build()
        except RuntimeError as error:
            failures.append(error)

    thread = threading.Thread(target=on_a_fresh_thread)
    thread.start()
    thread.join()
    assert failures == []
