"""Every expert spec a shipped profile uses runs on a host kernel (issue 15), and has a GPU int4 layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offload.config import ModelConfig
from offload.quant.codec import QuantizedExpert, codec_for
from offload.quant.host_kernels import INT4_GROUP_SIZES, int4_fits
from offload.quant.spec import QuantSpec
from offload.settings.profile import Profile

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "profiles").glob("*.toml"))  # the source tree's, which the package ships
MIXTRAL = ModelConfig.from_file(ROOT / "tests" / "fixtures" / "mixtral-8x7b-instruct-v0.1" / "config.json")
DEMO = ModelConfig.from_file(ROOT / "offload" / "demo" / "config.json")


def _quantized_expert_specs(path: Path, config: ModelConfig) -> set[QuantSpec]:
    specs = Profile.from_file(path).for_model(config).expert_specs
    return {QuantSpec.parse(str(spec)) for spec in specs} - {QuantSpec.parse("none")}


@pytest.mark.parametrize("path", PROFILES, ids=lambda path: path.stem)
def test_mixtral_experts_fit_the_int4_kernels(path: Path) -> None:
    d, f = MIXTRAL.hidden_size, MIXTRAL.intermediate_size
    for spec in _quantized_expert_specs(path, MIXTRAL):
        assert spec.backend == "hqq" and spec.bits == 4, f"{path.name}: {spec} has no int4 kernel"
        assert spec.group_size in INT4_GROUP_SIZES, (
            f"{path.name}: {spec}: torch's int4 kernels take groups 32-256"
        )
        if int4_fits(16, 64, 64):  # this torch has the CPU kernel
            assert int4_fits(f, d, spec.group_size) and int4_fits(d, f, spec.group_size)


@pytest.mark.parametrize("path", PROFILES, ids=lambda path: path.stem)
def test_a_demo_expert_runs_on_the_host_kernel(path: Path) -> None:
    """The profile's spec quantizes the demo model's experts, and the CPU runs them from their codes."""
    if not int4_fits(16, 64, 64):
        pytest.skip("this torch has no CPU int4 kernel")
    d, f = DEMO.hidden_size, DEMO.intermediate_size
    generator = torch.Generator().manual_seed(0)
    w1, w3 = (torch.randn(f, d, generator=generator) for _ in range(2))
    w2 = torch.randn(d, f, generator=generator)
    for spec in _quantized_expert_specs(path, DEMO):
        codec = codec_for(spec)
        expert = codec.materialize(codec.encode(w1, w2, w3), torch.float32, torch.device("cpu"))
        assert isinstance(expert, QuantizedExpert), f"{path.name}: {spec} is dequantized on the host"
        assert expert(torch.randn(2, d, generator=generator)).shape == (2, d)
