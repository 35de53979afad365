"""Dequantizing hqq codes on a CPU: hqq's own arithmetic bit for bit, without importing hqq.

Importing ``hqq.core.quantize`` takes seconds; a 3-bit expert (no CPU kernel) is dequantized at each cache miss,
so the first miss of a chat's first reply used to pay that import inside the TTFT.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload.checkpoint.convert import convert_checkpoint
from offload.quant import hqq_backend
from offload.quant.scheme import QuantScheme
from offload.quant.spec import QuantSpec
from tests.baby import BabySpec, write_baby

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 64])
@pytest.mark.parametrize("shape", [(64, 128), (48, 256), (40, 64)])
def test_dequantize_gives_hqqs_bits(bits: int, group: int, shape: tuple[int, int]) -> None:
    from hqq.core.quantize import Quantizer

    spec = QuantSpec.parse(f"hqq:{bits}:{group}")
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(bits * group))
    try:
        hqq_backend.check(spec, shape, "weight")
    except Exception:
        pytest.skip(f"{spec} does not store {shape}")
    tensors = hqq_backend.quantize(weight, spec, "weight")
    theirs = Quantizer.dequantize(tensors["W_q"], hqq_backend._meta(tensors, spec, torch.float32))
    ours = hqq_backend.dequantize(tensors, spec)
    assert ours.shape == shape and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


def test_a_3_bit_checkpoint_answers_on_a_cpu_without_importing_hqq(tmp_path: Path) -> None:
    source, converted = tmp_path / "baby", tmp_path / "converted"
    spec = BabySpec(
        "q3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        vocab_size=96,
        seed=3,
    )
    write_baby(spec, source)
    convert_checkpoint(source, converted, QuantScheme.build(2, attention="hqq:4:64", experts="hqq:3:64"))
    code = (
        "import sys, torch\n"
        "from offload.loading import OffloadOptions, load_model\n"
        "from offload.generate import SamplingParams, generate_ids\n"
        "model = load_model(sys.argv[1], dtype='float32', offload=OffloadOptions(experts_per_layer=2))\n"
        "ids = generate_ids(model, [1, 5, 9, 13], max_new_tokens=4, sampling=SamplingParams(temperature=0))\n"
        "assert ids, ids\n"
        "print('hqq imported' if any(name.startswith('hqq') for name in sys.modules) else 'no hqq')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(converted)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no hqq"
