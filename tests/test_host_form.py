"""The host store keeps 4-bit experts in the CPU kernel's layout (``offload.quant.host_form``): the same bytes as
the stored form, computing the same bits, and nothing is built again when the host or a CPU device runs one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from offload.errors import CacheError
from offload.experts.source import expert_tensors
from offload.experts.store import HostStore
from offload.loading import OffloadOptions, load_model
from offload.quant import host_form, host_kernels
from offload.quant.codec import QuantizedExpert, codec_for
from offload.quant.device_kernels import dequantized
from offload.quant.hqq_backend import codes4
from offload.quant.scheme import QuantScheme
from offload.quant.spec import QuantSpec
from tests.baby import BabySpec, write_baby
from tests.test_hybrid import PROMPT, run

HIDDEN, FFN, EXPERTS = 64, 128, 3


def _encoded(spec: str, seed: int, hidden: int = HIDDEN, ffn: int = FFN) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w1, w3 = (torch.randn(ffn, hidden, generator=generator) for _ in range(2))
    return codec_for(QuantSpec.parse(spec)).encode(w1, torch.randn(hidden, ffn, generator=generator), w3)


def _stores(spec: str) -> tuple[HostStore, HostStore, object]:
    """The same experts in a store of stored form and in one of host form."""
    codec = codec_for(QuantSpec.parse(spec))
    stored, converted = HostStore(1, EXPERTS), HostStore(1, EXPERTS, host_forms=[codec.host_form])
    for expert in range(EXPERTS):
        stored.put(0, expert, _encoded(spec, expert))
        converted.put(0, expert, _encoded(spec, expert))
    return stored, converted, codec


@pytest.mark.parametrize("shape", [(64, 32), (128, 256), (320, 64)])
def test_unpack_reads_back_every_code_the_packer_wrote(shape: tuple[int, int]) -> None:
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert host_kernels.packs_as_blocks(shape[0])
    assert torch.equal(host_kernels.unpack_int4(host_kernels.pack_int4(codes)), codes)


def test_host_form_takes_the_stored_bytes_and_computes_the_stored_forms_bits() -> None:
    stored, converted, codec = _stores("hqq:4:64")
    assert converted.in_host_form(0) and not stored.in_host_form(0)
    assert converted.nbytes == stored.nbytes  # 4-bit codes and 16-bit pairs: the same bytes
    assert "1 of 1 layers in the CPU kernel's layout" in converted.describe()
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(3))
    for expert in range(EXPERTS):
        tensors = converted.tensors(0, expert)
        assert set(tensors) == {f"{m}.{k}" for m in ("w1", "w2", "w3") for k in host_form.KEYS}
        want = codec.materialize(stored.tensors(0, expert), torch.float32, "cpu")
        got = codec.materialize(tensors, torch.float32, "cpu")
        assert isinstance(got, QuantizedExpert)
        assert torch.equal(got(x), want(x)), expert
        # Built over the store's own bytes: a host job copies and repacks nothing.
        buffer = converted.buffer(0, expert)
        inside = range(buffer.data_ptr(), buffer.data_ptr() + buffer.numel())
        assert all(tensor.data_ptr() in inside for tensor in expert_tensors(got)), expert


def test_host_form_weights_are_the_stored_weights_up_to_the_kernels_rounding() -> None:
    spec = QuantSpec.parse("hqq:4:64")
    tensors = _encoded("hqq:4:64", 7)
    matrix = {key.removeprefix("w2."): t for key, t in tensors.items() if key.startswith("w2.")}
    form = codec_for(spec).host_form(tensors)
    assert form is not None
    weights = host_form.dequantize({k.removeprefix("w2."): t for k, t in form.items() if k.startswith("w2.")})
    codes = codes4(matrix["W_q"], HIDDEN, FFN)
    assert torch.equal(
        weights, dequantized(codes, host_kernels.kernel_pairs(matrix["scale"], matrix["zero"]), 64)
    )
    hqq = (codes.float() - matrix["zero"].float().repeat_interleave(64, 1)) * matrix[
        "scale"
    ].float().repeat_interleave(64, 1)
    assert torch.allclose(weights, hqq, rtol=1e-2, atol=1e-2)  # bf16 scale and offset against fp16 ones


def test_no_cuda_kernel_on_a_cpu_tensor_and_specs_without_a_cpu_kernel_stay_stored() -> None:
    _, converted, _ = _stores("hqq:4:64")
    w1 = {k.removeprefix("w1."): t for k, t in converted.tensors(0, 0).items() if k.startswith("w1.")}
    assert host_form.device_linear(w1, torch.device("cpu")) is None
    for spec in ("hqq:3:64", "hqq:4:16", "bnb:int8", "none"):
        assert codec_for(QuantSpec.parse(spec)).host_form(_encoded(spec, 0)) is None, spec
        stored, still, _ = _stores(spec)
        assert not still.in_host_form(0) and still.nbytes == stored.nbytes, spec
    assert (
        codec_for(QuantSpec.parse("hqq:4:64"), host_kernels=False).host_form(_encoded("hqq:4:64", 0)) is None
    )


@pytest.mark.skipif(
    host_kernels.packs_as_blocks(96),
    reason="this CPU packs in blocks of 32 or 16 rows: every width here fits",
)
def test_an_expert_with_one_matrix_not_in_whole_blocks_keeps_its_stored_form_whole() -> None:
    # w1 and w3 (128 rows) are whole blocks of 64 rows (AVX-512), w2 (96 rows) is not.
    odd = _encoded("hqq:4:32", 0, hidden=96)
    assert host_kernels.packs_as_blocks(FFN)
    assert codec_for(QuantSpec.parse("hqq:4:32")).host_form(odd) is None
    out = {f"{m}.{k}": torch.zeros(1) for m in ("w1", "w2", "w3") for k in host_form.KEYS}
    assert codec_for(QuantSpec.parse("hqq:4:32")).host_form(odd, out=out) is None
    assert all(torch.equal(t, torch.zeros(1)) for t in out.values())  # nothing half written


def test_an_expert_of_another_shape_is_refused_with_its_place() -> None:
    codec = codec_for(QuantSpec.parse("hqq:4:64"))
    store = HostStore(2, EXPERTS, host_forms=[codec.host_form, codec.host_form])
    store.put(1, 0, _encoded("hqq:4:64", 0))
    with pytest.raises(CacheError, match="layer 1 expert 2"):
        store.put(1, 2, _encoded("hqq:4:64", 1, ffn=2 * FFN))
    with pytest.raises(CacheError, match="host forms for 2 layers"):
        HostStore(2, EXPERTS, host_forms=[codec.host_form])


def count_repacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at every matrix packed for the CPU int4 kernel from hqq's layout, from now on."""
    repacked: list[int] = []
    original = host_kernels.pack_int4_halves
    monkeypatch.setattr(
        "offload.quant.hqq_backend.pack_int4_halves", lambda *a, **k: repacked.append(1) or original(*a, **k)
    )
    return repacked


def test_hybrid_host_jobs_and_cpu_slots_repack_nothing_after_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_baby(BabySpec("form", num_hidden_layers=3, hidden_size=64, intermediate_size=128), tmp_path)
    scheme = QuantScheme.build(3, attention="hqq:4:64", experts="hqq:4:64")
    want = run(load_model(tmp_path, dtype="float32", quant=scheme), PROMPT)
    options = OffloadOptions(experts_per_layer=1, prefetch=1, host_compute="always", link="emulated:20")
    model = load_model(tmp_path, dtype="float32", quant=scheme, offload=options)
    repacked = count_repacks(monkeypatch)
    got = run(model, PROMPT)
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
    stats = model.expert_source.stats.total()
    assert stats.host_computes > 0 and stats.misses > 0
    assert repacked == []  # was one repack per matrix of every host job and every slot load


@pytest.mark.cuda
def test_a_gpu_repacks_the_host_form_into_the_stored_forms_cuda_kernel() -> None:
    """After the copy the GPU takes the host's blocks apart itself: the same kernel, the same bits."""
    stored, converted, codec = _stores("hqq:4:64")
    x = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(5)).cuda()
    for expert in range(EXPERTS):
        want = codec.materialize(
            {k: t.cuda() for k, t in stored.tensors(0, expert).items()}, torch.bfloat16, "cuda"
        )
        got = codec.materialize(
            {k: t.cuda() for k, t in converted.tensors(0, expert).items()}, torch.bfloat16, "cuda"
        )
        assert type(got.w1).__name__ == type(want.w1).__name__ == "CudaInt4Linear"
        assert torch.equal(got(x), want(x)), expert


@pytest.fixture(scope="module")
def converted_4bit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_host_tier_model import convert

    root = tmp_path_factory.mktemp("form-tier")
    write_baby(
        BabySpec("form-tier", num_hidden_layers=3, hidden_size=64, intermediate_size=128, seed=4), root / "f"
    )
    return convert(root / "f", root / "q4", "--experts", "hqq:4:64", "--attention", "hqq:4:64")


def test_the_host_tier_converts_each_read_once_and_host_jobs_build_nothing(
    converted_4bit: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = run(load_model(converted_4bit, dtype="float32"), PROMPT)
    options = OffloadOptions(
        experts_per_layer=1, prefetch=1, host_compute="always", link="emulated:20", host_memory_gib=1.0
    )
    slot_bytes = load_model(
        converted_4bit, dtype="float32", offload=options
    ).expert_source.host_tier.slot_bytes
    options = dataclasses.replace(options, host_memory_gib=12 * slot_bytes / 2**30)  # half the experts
    model = load_model(converted_4bit, dtype="float32", offload=options)
    tier = model.expert_source.host_tier
    assert tier is not None and tier.slots == 12
    assert [piece.name for piece in tier.layout(0).slices][:2] == ["w1.packed", "w1.pairs"]
    repacked = count_repacks(monkeypatch)
    got = run(model, PROMPT)
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
    assert model.expert_source.stats.total().host_computes > 0
    reads = tier.stats.total().reads
    assert reads > 0 and len(repacked) == 3 * reads  # one conversion per read, on the reader; none per job
