"""Quantization specs: what users may write, the canonical text, and the storage arithmetic `offload plan` uses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from offload.errors import QuantError
from offload.quant.codec import codec_for, expert_nbytes
from offload.quant.linear import bits_per_weight
from offload.quant.spec import ROLES, QuantSpec

VALID = [
    *(f"hqq:{bits}:{group}" for bits in (2, 3, 4, 8) for group in (16, 32, 64, 128)),
    "bnb:nf4",
    "bnb:fp4",
    "bnb:int8",
    "none",
]


@pytest.mark.parametrize("text", VALID)
def test_canonical_text_round_trips(text):
    spec = QuantSpec.parse(text)
    assert str(spec) == text
    assert QuantSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hqq:3", QuantSpec("hqq", 3, 64, None)),  # the default group
        ("hqq:2:16", QuantSpec("hqq", 2, 16, None)),
        (" HQQ:4:64 ", QuantSpec("hqq", 4, 64, None)),
        ("bnb:nf4", QuantSpec("bnb", 4, None, "nf4")),
        ("bnb:fp4", QuantSpec("bnb", 4, None, "fp4")),
        ("bnb:int8", QuantSpec("bnb", 8, None, "int8")),
        ("none", QuantSpec("none", None, None, None)),
    ],
)
def test_parse_fills_every_field(text, expected):
    assert QuantSpec.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("gptq:4", "unknown backend 'gptq'"),
        ("hqq:5", "hqq bits must be one of 2, 3, 4, 8"),
        ("hqq:four", "hqq bits must be one of 2, 3, 4, 8"),
        ("hqq:4:48", "hqq group size must be one of 16, 32, 64, 128"),
        ("hqq:4:-64", "hqq group size"),
        ("bnb:nf3", "bnb kind must be one of nf4, fp4, int8"),
        ("hqq", "wrong number of ':'-separated fields for hqq"),
        ("hqq:4:64:1", "wrong number"),
        ("bnb", "wrong number"),
        ("none:16", "wrong number"),
        ("", "unknown backend ''"),
    ],
)
def test_bad_specs_name_the_source_and_what_is_allowed(text, complaint):
    with pytest.raises(QuantError) as caught:
        QuantSpec.parse(text, where="profiles/x.toml [quant] experts")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"profiles/x.toml [quant] experts: bad quantization spec {text!r}")
    assert complaint in message
    assert "allowed: hqq:BITS[:GROUP]" in message and "bnb:int8" in message


def test_a_non_string_spec_is_refused():
    with pytest.raises(QuantError, match=r"quant\.experts: expected a quantization spec string, got 4"):
        QuantSpec.parse(4, where="quant.experts")


@pytest.mark.parametrize(
    "fields",
    [
        ("hqq", 5, 64, None),
        ("hqq", 4, 48, None),
        ("hqq", 4, 64, "nf4"),
        ("bnb", 8, None, "nf4"),
        ("bnb", 4, 64, "nf4"),
        ("none", 16, None, None),
        ("gguf", None, None, None),
    ],
)
def test_an_invalid_spec_cannot_be_built(fields):
    with pytest.raises(QuantError, match="invalid quantization spec"):
        QuantSpec(*fields)


def test_specs_are_frozen_and_hashable():
    spec = QuantSpec.parse("hqq:2:16")
    assert {spec: 1}[QuantSpec.parse("hqq:2:16")] == 1
    with pytest.raises(AttributeError):
        spec.bits = 3


def test_roles():
    assert ROLES == ("attention", "experts", "gate", "embed", "lm_head")


# Mixtral 8x7B's expert matrix: the numbers `offload plan` shows, from arithmetic alone.
@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("hqq:2:16", 4.0),  # 2 + fp16 scale and zero per 16 weights
        ("hqq:2:32", 3.0),
        ("hqq:2:64", 2.5),
        ("hqq:3:64", 3.7),  # ten 3-bit codes per int32: 3.2 + 0.5
        ("hqq:4:64", 4.5),
        ("hqq:8:128", 8.25),
        ("bnb:nf4", 4 + 8 / 64 + 32 / 64 / 256),  # double-quantized absmax
        ("bnb:int8", 8 + 32 / 4096),  # an fp32 absmax per row
        ("none", 16.0),
    ],
)
def test_bits_per_weight_at_mixtral_scale(text, bits):
    assert bits_per_weight(QuantSpec.parse(text), (14336, 4096)) == pytest.approx(bits, abs=1e-4)


def test_expert_nbytes_at_mixtral_scale():
    weights = 3 * 14336 * 4096
    assert expert_nbytes(QuantSpec.parse("none"), 4096, 14336) == 2 * weights
    assert expert_nbytes(QuantSpec.parse("hqq:4:64"), 4096, 14336) == weights * 9 // 16


def test_a_group_that_does_not_divide_the_row_is_refused_before_quantizing():
    with pytest.raises(
        QuantError, match=r"hqq:4:64 cannot quantize weight of shape \(128, 40\).*row length 40"
    ):
        bits_per_weight(QuantSpec.parse("hqq:4:64"), (128, 40))


def test_importing_the_package_loads_neither_library():
    # hqq alone takes seconds to import, and `offload --help` must stay instant.
    code = "import sys, offload.quant; print(sorted({'hqq', 'bitsandbytes'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_codec_for_keeps_the_spec():
    spec = QuantSpec.parse("bnb:nf4")
    assert codec_for(spec).spec is spec
