"""On a CPU, a small half-precision checkpoint computes in float32 unless --dtype says otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.config import ModelConfig
from offload.settings.flags import LoadFlags
from offload.settings.resolve import resolve_settings

DEMO = Path(__file__).resolve().parent.parent / "offload" / "demo" / "config.json"
MIXTRAL = Path(__file__).resolve().parent / "fixtures" / "mixtral-8x7b-instruct-v0.1" / "config.json"


@pytest.mark.parametrize(
    ("config_path", "flags", "dtype"),
    [
        (DEMO, {}, "float32"),  # 14 M parameters in bf16: float32 is faster on a CPU
        (DEMO, {"flags": LoadFlags(device="cpu", dtype="bfloat16")}, "bfloat16"),  # the flag wins
        (DEMO, {"attention_spec": "hqq:4:64"}, None),  # quantized: the checkpoint's dtype
        (MIXTRAL, {}, None),  # 47 B parameters: float32 would double the RAM
    ],
)
def test_cpu_compute_dtype(config_path: Path, flags: dict, dtype: str | None) -> None:
    flags = {"flags": LoadFlags(device="cpu"), **flags}
    settings = resolve_settings(ModelConfig.from_file(config_path), **flags)
    assert settings.dtype == dtype
