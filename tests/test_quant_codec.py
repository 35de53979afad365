"""Experts and linears survive the trip through one byte buffer (and safetensors) bit for bit.

The offloading invariant rests on this: the same encoded tensors, wherever their bytes were moved, give
bit-identical outputs.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from offload.errors import QuantError
from offload.experts.source import DenseExpert, one_token_layout
from offload.quant.codec import QuantizedExpert, codec_for, expert_nbytes
from offload.quant.linear import backend_for, build_linear, quantize_linear
from offload.quant.spec import QuantSpec

SPECS = ["hqq:2:16", "hqq:3:64", "hqq:4:64", "hqq:8:64", "bnb:nf4", "bnb:fp4", "bnb:int8", "none"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN, FFN = 64, 128
CPU = torch.device("cpu")


def pack(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """All tensors' bytes in one uint8 buffer, each 16-byte aligned, and where each one lies."""
    chunks, layout, offset = [], {}, 0
    for name, tensor in tensors.items():
        padding = -offset % 16
        chunks.append(torch.zeros(padding, dtype=torch.uint8))
        offset += padding
        raw = tensor.reshape(-1).view(torch.uint8)
        layout[name] = (offset, raw.numel(), tensor.dtype, tuple(tensor.shape))
        chunks.append(raw)
        offset += raw.numel()
    return torch.cat(chunks), layout


def unpack(buffer: torch.Tensor, layout: dict) -> dict[str, torch.Tensor]:
    """Views into ``buffer``, no copies."""
    return {
        name: buffer[offset : offset + size].view(dtype).view(shape)
        for name, (offset, size, dtype, shape) in layout.items()
    }


def _expert_weights(hidden: int = HIDDEN, ffn: int = FFN, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    w1 = torch.randn(ffn, hidden, generator=generator) / hidden**0.5
    w2 = torch.randn(hidden, ffn, generator=generator) / ffn**0.5
    w3 = torch.randn(ffn, hidden, generator=generator) / hidden**0.5
    return w1.to(dtype), w2.to(dtype), w3.to(dtype)


@functools.cache
def _encoded(text: str) -> dict[str, torch.Tensor]:
    return codec_for(QuantSpec.parse(text)).encode(*_expert_weights())


def _inputs(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(2)).to(dtype)


@pytest.mark.parametrize("text", SPECS)
def test_encode_gives_plain_contiguous_cpu_tensors_of_the_predicted_size(text):
    tensors = _encoded(text)
    assert {name.split(".")[0] for name in tensors} == {"w1", "w2", "w3"}
    for name, tensor in tensors.items():
        assert type(tensor) is torch.Tensor, name
        assert tensor.is_contiguous() and tensor.device == CPU, name
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored == expert_nbytes(QuantSpec.parse(text), HIDDEN, FFN, dtype=torch.float32)


@pytest.mark.parametrize("text", SPECS)
def test_encoding_is_deterministic(text):
    # `offload convert` and quantize-in-memory must store the same bytes.
    again = codec_for(QuantSpec.parse(text)).encode(*_expert_weights())
    assert list(again) == list(_encoded(text))
    assert all(torch.equal(again[name], tensor) for name, tensor in _encoded(text).items())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("text", SPECS)
def test_an_expert_rebuilt_from_one_buffer_is_bit_identical(text, dtype):
    codec = codec_for(QuantSpec.parse(text))
    tensors = _encoded(text)
    x = _inputs(dtype)
    direct = codec.materialize(tensors, dtype, CPU)(x)
    buffer, layout = pack(tensors)
    moved = codec.materialize(unpack(buffer.clone(), layout), dtype, CPU)(x)
    again = codec.materialize(tensors, dtype, CPU)(x)
    assert direct.dtype == dtype and direct.shape == (5, HIDDEN)
    assert torch.equal(direct, moved)
    assert torch.equal(direct, again)


@pytest.mark.parametrize("text", SPECS)
def test_an_expert_survives_safetensors(text):
    codec = codec_for(QuantSpec.parse(text))
    tensors = _encoded(text)
    reloaded = load_safetensors(save_safetensors(tensors))
    x = _inputs(torch.bfloat16)
    assert torch.equal(
        codec.materialize(tensors, torch.bfloat16, CPU)(x),
        codec.materialize(reloaded, torch.bfloat16, CPU)(x),
    )


HOST_KERNEL_SPECS = [
    "hqq:4:64",
    "bnb:int8",
]  # specs a CPU kernel computes from the codes (test_host_kernels.py)


@pytest.mark.parametrize("text", [spec for spec in SPECS if spec not in HOST_KERNEL_SPECS])
def test_on_cpu_an_expert_without_a_host_kernel_is_dequantized_once(text):
    expert = codec_for(QuantSpec.parse(text)).materialize(_encoded(text), torch.bfloat16, CPU)
    assert isinstance(expert, DenseExpert)
    assert [w.dtype for w in (expert.w1, expert.w2, expert.w3)] == [torch.bfloat16] * 3
    assert expert.w1.shape == (FFN, HIDDEN) and expert.w2.shape == (HIDDEN, FFN)


def test_none_keeps_the_weights_exactly():
    w1, w2, w3 = _expert_weights()
    x = _inputs(torch.float32)
    expert = codec_for(QuantSpec.parse("none")).materialize(_encoded("none"), torch.float32, CPU)
    assert torch.equal(expert(x), DenseExpert(w1, w2, w3)(x))


def test_none_keeps_a_16_bit_checkpoint_in_16_bits():
    weights = _expert_weights(dtype=torch.bfloat16)
    tensors = codec_for(QuantSpec.parse("none")).encode(*weights)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert sum(t.numel() * 2 for t in tensors.values()) == expert_nbytes(QuantSpec.parse("none"), HIDDEN, FFN)


def test_none_copies_weights_that_share_storage():
    # A fused (E, F, D) tensor sliced per expert: safetensors refuses tensors that share memory.
    fused = torch.randn(2, FFN, HIDDEN)
    tensors = codec_for(QuantSpec.parse("none")).encode(fused[0], fused[1].T.contiguous(), fused[1])
    save_safetensors(tensors)


@pytest.mark.parametrize("text", SPECS)
def test_a_linear_rebuilt_from_one_buffer_is_bit_identical(text):
    spec = QuantSpec.parse(text)
    weight = _expert_weights()[0]
    tensors = quantize_linear(weight, spec)
    buffer, layout = pack(tensors)
    x = _inputs(torch.float32)
    direct = build_linear(tensors, spec, torch.bfloat16, CPU)(x.bfloat16())
    moved = build_linear(unpack(buffer, layout), spec, torch.bfloat16, CPU)(x.bfloat16())
    assert direct.shape == (5, FFN) and direct.dtype == torch.bfloat16
    assert torch.equal(direct, moved)


def test_a_none_linear_is_f_linear():
    weight = _expert_weights()[0]
    x = _inputs(torch.float32)
    tensors = quantize_linear(weight, QuantSpec.parse("none"))
    assert list(tensors) == ["weight"]
    got = build_linear(tensors, QuantSpec.parse("none"), torch.float32, "cpu")(x)
    # Bit for bit against the same weight in the layout it computes in (``one_token_layout``: the summation order
    # depends on it, and on MKL's thread count); to rounding against the row-major weight.
    assert torch.equal(got, F.linear(x, one_token_layout(weight)))
    assert torch.allclose(got, F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text", [spec for spec in SPECS if spec != "none"])
def test_the_library_kernels_agree_with_the_dense_path(text):
    """The modules CUDA gets (HQQLinear, bnb matmuls) also run on CPU: check them against dequantize-once."""
    spec = QuantSpec.parse(text)
    tensors = _encoded(text)
    parts = [
        {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{m}.")}
        for m in ("w1", "w2", "w3")
    ]
    kernels = QuantizedExpert(*(backend_for(spec).kernel_linear(p, spec, torch.float32, CPU) for p in parts))
    dense = codec_for(spec, host_kernels=False).materialize(tensors, torch.float32, CPU)
    x = _inputs(torch.float32)
    # hqq and bnb 4-bit dequantize to the same fp32 weights; LLM.int8() also rounds the activations to int8.
    tolerance = 3e-2 if spec.kind == "int8" else 1e-5
    assert ((kernels(x) - dense(x)).norm() / dense(x).norm()).item() < tolerance


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("text", SPECS)
def test_on_cuda_the_expert_stays_quantized_and_matches_the_cpu(text):
    spec = QuantSpec.parse(text)
    codec = codec_for(spec)
    cuda = torch.device("cuda")
    on_device = {name: tensor.to(cuda) for name, tensor in _encoded(text).items()}
    expert = codec.materialize(on_device, torch.float16, cuda)
    assert isinstance(expert, DenseExpert if text == "none" else QuantizedExpert)
    x = _inputs(torch.float16)
    reference = codec.materialize(_encoded(text), torch.float32, CPU)(x.float())
    assert ((expert(x.to(cuda)).float().cpu() - reference).norm() / reference.norm()).item() < 3e-2


@pytest.mark.parametrize(
    ("text", "shape", "complaint"),
    [
        (
            "hqq:4:64",
            (128, 40),
            r"hqq:4:64 cannot quantize expert.w1 of shape \(128, 40\): group size 64 must "
            r"divide the row length 40; no hqq group size fits",
        ),
        ("hqq:4:64", (128, 96), r"row length 96; use hqq:4:16, hqq:4:32"),
        (
            "hqq:2:16",
            (3, 16),
            r"shape \(3, 16\): the 3 groups must split into 4 equal blocks for 2-bit packing",
        ),
        (
            "bnb:nf4",
            (128, 33),
            r"bnb:nf4 cannot quantize expert.w1 of shape \(128, 33\): the row length must be even",
        ),
    ],
)
def test_a_weight_the_spec_cannot_store_is_refused_with_its_shape(text, shape, complaint):
    w1 = torch.randn(shape)
    with pytest.raises(QuantError, match=complaint):
        codec_for(QuantSpec.parse(text)).encode(w1, torch.randn(shape[::-1]), torch.randn(shape))


def test_mismatched_expert_shapes_are_refused():
    w1, w2, w3 = _expert_weights()
    with pytest.raises(QuantError, match=r"layers.0.experts.1: expected w1 and w3 of shape \(F, D\)"):
        codec_for(QuantSpec.parse("none")).encode(w1, w2, w3.T, where="layers.0.experts.1")


def test_missing_tensors_are_named():
    tensors = dict(_encoded("hqq:4:64"))
    del tensors["w2.scale"]
    with pytest.raises(QuantError, match="hqq:4:64 needs tensors W_q, scale, zero for w2; missing scale"):
        codec_for(QuantSpec.parse("hqq:4:64")).materialize(tensors, torch.float32, CPU)
