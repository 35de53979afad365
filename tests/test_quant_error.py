"""How much each quantization spec perturbs the outputs users see, and how many bits it really stores.

Seeded Gaussian weights scaled for unit-variance outputs (hidden 128, FFN 256, 16 tokens). Each bound sits 25%
above what hqq 0.2.8 and bitsandbytes 0.50 measured on CPU. The relative weight error matches hqq's published
numbers (4-bit g64: 0.087); an expert's output error is about 1.8 times it, since w1, w3 and w2 all add error.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from offload.quant.codec import codec_for
from offload.quant.linear import bits_per_weight, build_linear, quantize_linear
from offload.quant.spec import QuantSpec

HIDDEN, FFN, TOKENS = 128, 256, 16

# spec -> bounds on the relative output error ||y_q - y|| / ||y|| of (a linear, an expert)
BOUNDS = {
    "hqq:2:16": (0.375, 0.742),  # measured 0.2998, 0.5932
    "hqq:2:64": (0.534, 1.105),  # measured 0.4272, 0.8833
    "hqq:3:16": (0.160, 0.287),  # measured 0.1280, 0.2295
    "hqq:3:64": (0.232, 0.443),  # measured 0.1850, 0.3539
    "hqq:4:16": (0.079, 0.142),  # measured 0.0625, 0.1135
    "hqq:4:64": (0.108, 0.194),  # measured 0.0862, 0.1545
    "hqq:4:128": (0.126, 0.235),  # measured 0.1002, 0.1876
    "hqq:8:64": (0.0064, 0.0118),  # measured 0.0051, 0.0094
    "bnb:nf4": (0.114, 0.209),  # measured 0.0908, 0.1670
    "bnb:fp4": (0.152, 0.278),  # measured 0.1210, 0.2218
    "bnb:int8": (0.0083, 0.015),  # measured 0.0066, 0.0120
}


def _relative(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


@functools.cache
def _weights() -> tuple[torch.Tensor, ...]:
    """An expert's w1, w2, w3 and a batch of inputs, seeded."""
    generator = torch.Generator().manual_seed(0)
    w1 = torch.randn(FFN, HIDDEN, generator=generator) / HIDDEN**0.5
    w2 = torch.randn(HIDDEN, FFN, generator=generator) / FFN**0.5
    w3 = torch.randn(FFN, HIDDEN, generator=generator) / HIDDEN**0.5
    x = torch.randn(TOKENS, HIDDEN, generator=generator)
    return w1, w2, w3, x


@functools.cache
def _errors(text: str) -> tuple[float, float]:
    """Relative output errors (linear w1, whole expert) of ``text`` on the seeded weights, in fp32."""
    spec = QuantSpec.parse(text)
    w1, w2, w3, x = _weights()
    linear = build_linear(quantize_linear(w1, spec), spec, torch.float32, "cpu")
    codec = codec_for(spec)
    expert = codec.materialize(codec.encode(w1, w2, w3), torch.float32, torch.device("cpu"))
    exact = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    return _relative(linear(x), F.linear(x, w1)), _relative(expert(x), exact)


@pytest.mark.parametrize("text", BOUNDS)
def test_output_error_is_within_the_measured_bound(text):
    linear_error, expert_error = _errors(text)
    linear_bound, expert_bound = BOUNDS[text]
    assert linear_error < linear_bound, f"{text}: linear output error {linear_error:.4f}"
    assert expert_error < expert_bound, f"{text}: expert output error {expert_error:.4f}"


def test_none_is_exact():
    assert _errors("none") == (0.0, 0.0)


@pytest.mark.parametrize(
    "worse_to_better",
    [
        ("hqq:2:64", "hqq:3:64", "hqq:4:64", "hqq:8:64"),  # more bits
        ("hqq:4:128", "hqq:4:64", "hqq:4:16"),  # smaller groups
        ("hqq:2:64", "hqq:2:16"),
        ("bnb:fp4", "bnb:nf4", "bnb:int8"),  # nf4 fits Gaussian weights better than fp4
    ],
)
def test_error_falls_with_more_bits_and_smaller_groups(worse_to_better):
    expert_errors = [_errors(text)[1] for text in worse_to_better]
    assert expert_errors == sorted(expert_errors, reverse=True), dict(
        zip(worse_to_better, expert_errors, strict=True)
    )


@pytest.mark.parametrize("text", [*BOUNDS, "hqq:3:128", "hqq:2:32", "none"])
@pytest.mark.parametrize("shape", [(FFN, HIDDEN), (HIDDEN, FFN), (48, 64)])
def test_bits_per_weight_counts_the_stored_bytes(text, shape):
    spec = QuantSpec.parse(text)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    if text.startswith("hqq:") and shape[1] % spec.group_size:
        pytest.skip("group does not divide the row")
    stored = sum(t.numel() * t.element_size() for t in quantize_linear(weight, spec).values())
    assert bits_per_weight(spec, shape, torch.bfloat16) == pytest.approx(
        8 * stored / weight.numel(), rel=1e-12
    )
