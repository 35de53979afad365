"""Mixtral's router, ``route``: softmax in fp32 over all experts, top-k, renormalise; checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from offload.experts.source import route

# Four experts whose probabilities are 0.1, 0.2, 0.3 and 0.4.
LOGITS = torch.tensor([[math.log(1), math.log(2), math.log(3), math.log(4)]])


def test_top_two_of_four_by_hand() -> None:
    weights, ids = route(LOGITS, 2)
    assert ids.tolist() == [[3, 2]]
    assert weights[0].tolist() == pytest.approx([4 / 7, 3 / 7], abs=1e-6)


def test_k_of_one_gives_the_best_expert_all_the_weight() -> None:
    weights, ids = route(LOGITS, 1)
    assert ids.tolist() == [[3]]
    assert weights.tolist() == [[1.0]]


def test_k_of_every_expert_gives_the_softmax_itself() -> None:
    weights, ids = route(LOGITS, 4)
    assert ids.tolist() == [[3, 2, 1, 0]]
    assert weights[0].tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=1e-6)


def test_tied_experts_share_the_weight_equally() -> None:
    weights, ids = route(torch.tensor([[2.0, 2.0, 0.0, 0.0]]), 2)
    assert sorted(ids.tolist()[0]) == [0, 1]
    assert weights.tolist() == [[0.5, 0.5]]
    weights, ids = route(torch.tensor([[0.0, 0.0, 0.0, 0.0]]), 1)  # all tied: one of them, weight 1
    assert ids.item() in range(4) and weights.tolist() == [[1.0]]


def test_each_token_is_routed_on_its_own() -> None:
    logits = torch.cat([LOGITS, LOGITS.flip(-1)])  # (T=2, E=4)
    weights, ids = route(logits, 2)
    assert ids.tolist() == [[3, 2], [0, 1]]
    assert weights.flatten().tolist() == pytest.approx([4 / 7, 3 / 7] * 2, abs=1e-6)


def test_half_precision_logits_are_routed_in_fp32() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 8, generator=generator) * 3).to(torch.bfloat16)
    weights, ids = route(logits, 2)
    assert weights.dtype == torch.float32
    probs = torch.softmax(logits.double(), dim=-1)  # the exact softmax of the bf16 values
    top, expected_ids = torch.topk(probs, 2, dim=-1)
    assert torch.equal(ids, expected_ids)
    # fp32 keeps about 7 digits; a softmax in bf16 would be off in the third.
    assert torch.allclose(weights.double(), top / top.sum(-1, keepdim=True), rtol=1e-6, atol=0)
    assert torch.allclose(weights.sum(-1), torch.ones(16))
