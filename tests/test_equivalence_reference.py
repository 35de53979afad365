"""Our engine against transformers' MixtralForCausalLM on random baby checkpoints."""

from __future__ import annotations

import pytest
import torch

from offload.experts.source import route
from offload.kv_cache import KVCache
from offload.loading import load_model
from tests.baby import BABIES

NAMES = [spec.name for spec in BABIES]


def prompt(vocab: int, length: int = 20, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, length), generator=generator)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(baby_dirs: dict, name: str) -> None:
    directory, reference = baby_dirs[name]
    model = load_model(directory, dtype="float32")
    ids = prompt(model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids)
        theirs = reference(ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ours.abs().max().item() > 0.1, "logits this small would make the comparison meaningless"


@pytest.mark.parametrize("name", NAMES)
def test_greedy_64_tokens_match_transformers(baby_dirs: dict, name: str) -> None:
    from offload.generate import SamplingParams, generate_ids

    directory, reference = baby_dirs[name]
    model = load_model(directory, dtype="float32")
    ids = prompt(model.config.vocab_size, length=9, seed=1)
    with torch.no_grad():
        theirs = reference.generate(
            ids, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0, eos_token_id=None
        )[0, ids.shape[1] :].tolist()
    ours = generate_ids(
        model, ids[0].tolist(), max_new_tokens=64, sampling=SamplingParams(temperature=0), stop_ids=()
    )
    assert ours == theirs
    assert len(set(ours)) > 3, "a degenerate sequence would not test much"


@pytest.mark.parametrize("name", NAMES)
def test_cached_decode_equals_recompute(baby_dirs: dict, name: str) -> None:
    directory, _ = baby_dirs[name]
    model = load_model(directory, dtype="float32")
    ids = prompt(model.config.vocab_size, length=24, seed=2)
    cache = KVCache(model.config, capacity=8, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        full = model(ids)
        pieces = [model(ids[:, :5], cache)]  # prefill, then token by token, growing the cache past 8
        pieces += [model(ids[:, t : t + 1], cache) for t in range(5, 24)]
    cached = torch.cat(pieces, dim=1)
    assert cache.length == 24
    assert (cached - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_one_token_path_gives_the_bits_of_the_general_path(baby_dir, dtype: str) -> None:
    model = load_model(baby_dir, dtype=dtype)
    hidden = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(
        model.dtype
    )
    for layer in model.model.layers:
        block = layer.block_sparse_moe
        for row, residual in zip(hidden.split(1), hidden.flip(0).split(1), strict=True):
            weights, ids = route(block.gate(row), block.top_k)
            chosen = ids.flatten().tolist()
            fast = block._one_token(row, weights, chosen, [], residual)
            assert torch.equal(fast, block._tokens(row, weights, chosen, [], residual))
