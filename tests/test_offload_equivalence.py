"""Offloaded experts give bit-identical results to resident ones: the main invariant of the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offload.generate import SamplingParams, generate_ids
from offload.kv_cache import KVCache
from offload.loading import OffloadOptions, load_model
from tests.baby import BabySpec, write_baby

LINKS = ["local", "emulated:50:5", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(scope="module", params=[4, 8], ids=["E4", "E8"])
def moe_baby(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    experts = request.param
    directory = tmp_path_factory.mktemp(f"moe{experts}")
    write_baby(
        BabySpec(f"moe{experts}", num_local_experts=experts, num_hidden_layers=3, seed=experts), directory
    )
    return directory


def run(model: torch.nn.Module, prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Prefill logits, then a sampled continuation (sampling makes any logit difference visible)."""
    cache = KVCache(model.config, 64, dtype=model.dtype, device=model.device)
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=model.device), cache)
    tokens = generate_ids(model, prompt, max_new_tokens=12, sampling=SamplingParams(temperature=1.0, seed=3))
    return logits, tokens


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("link", LINKS)
def test_offloaded_equals_resident(moe_baby: Path, dtype: str, link: str) -> None:
    device = "cuda" if link == "cuda" else "cpu"
    resident = load_model(moe_baby, dtype=dtype, device=device)
    experts = resident.config.num_local_experts
    prompt = torch.randint(
        3, resident.config.vocab_size, (10,), generator=torch.Generator().manual_seed(5)
    ).tolist()
    want_logits, want_tokens = run(resident, prompt)
    for slots in sorted({1, 2, experts - 1, experts}):
        for prefetch in (0, 1, 2):
            options = OffloadOptions(experts_per_layer=slots, prefetch=prefetch, link=link)
            offloaded = load_model(moe_baby, dtype=dtype, device=device, offload=options)
            logits, tokens = run(offloaded, prompt)
            where = f"K={slots} prefetch={prefetch}"
            assert torch.equal(logits, want_logits), where
            assert tokens == want_tokens, where
            stats = offloaded.expert_source.stats.as_dict()
            assert stats["hits"] + stats["misses"] == stats["accesses"] > 0, where
            if slots < experts:
                assert stats["bytes_moved"] > 0, where


def test_offloaded_per_layer_slots_and_quantized_experts(tmp_path: Path) -> None:
    from offload.quant.scheme import QuantScheme

    write_baby(BabySpec("mixed", num_hidden_layers=3, hidden_size=64, intermediate_size=128), tmp_path)
    scheme = QuantScheme.build(
        3, attention="hqq:4:64", experts="hqq:2:16", expert_overrides={0: "hqq:3:64", -1: "bnb:nf4"}
    )
    prompt = list(range(5, 17))
    resident = load_model(tmp_path, dtype="float32", quant=scheme)
    options = OffloadOptions(experts_per_layer=[1, 3, 2], prefetch=2, link="emulated:20")
    offloaded = load_model(tmp_path, dtype="float32", quant=scheme, offload=options)
    float_model = load_model(tmp_path, dtype="float32")
    want_logits, want_tokens = run(resident, prompt)
    logits, tokens = run(offloaded, prompt)
    assert torch.equal(logits, want_logits)
    assert tokens == want_tokens
    float_logits, _ = run(float_model, prompt)
    assert not torch.equal(logits, float_logits), "the scheme must really quantize"
