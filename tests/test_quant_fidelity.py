"""The fidelity metrics of benchmarks/quant_fidelity.py: agreement, perplexity rise and KL on made-up logits."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.quant_fidelity import PROFILE, ROOT, Tally, describe, plan, verdict
from offload.config import ModelConfig
from offload.quant.scheme import QuantScheme


def test_identical_logits_agree_everywhere_with_no_rise_and_no_kl() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    tally = Tally()
    tally.add(logits, logits.clone(), labels)
    result = tally.summary()
    assert result["tokens"] == 10
    assert result["agreement"] == 1.0
    assert result["ppl_rise"] == pytest.approx(0.0, abs=1e-9)
    assert result["kl"] == pytest.approx(0.0, abs=1e-7)
    nll = -torch.log_softmax(logits, -1).gather(-1, labels[..., None]).mean()
    assert result["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-6)


def test_agreement_perplexity_and_kl_by_hand() -> None:
    # Two positions over two classes: the reference is certain-ish of class 0 at both,
    # the other model flips the second position to class 1.
    reference = torch.log(torch.tensor([[[0.75, 0.25], [0.75, 0.25]]]))
    other = torch.log(torch.tensor([[[0.75, 0.25], [0.25, 0.75]]]))
    labels = torch.tensor([[0, 0]])
    tally = Tally()
    tally.add(reference, other, labels)
    result = tally.summary()
    assert result["agreement"] == 0.5
    assert result["reference_perplexity"] == pytest.approx(1 / 0.75)
    assert result["perplexity"] == pytest.approx(math.exp(-(math.log(0.75) + math.log(0.25)) / 2))
    assert result["ppl_rise"] == pytest.approx(result["perplexity"] * 0.75 - 1)
    kl_flipped = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)
    assert result["kl"] == pytest.approx(kl_flipped / 2, rel=1e-6)


def test_tallies_accumulate_over_batches() -> None:
    torch.manual_seed(1)
    reference, other = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    labels = torch.randint(0, 5, (4, 3))
    whole, parts = Tally(), Tally()
    whole.add(reference, other, labels)
    for half in (slice(0, 2), slice(2, 4)):
        parts.add(reference[half], other[half], labels[half])
    for key, value in whole.summary().items():
        assert parts.summary()[key] == pytest.approx(value, rel=1e-6)


def test_plan_covers_every_spec_and_the_profile() -> None:
    config = ModelConfig.from_file(ROOT / "offload" / "demo" / "config.json")
    rows = plan(config.num_hidden_layers, config, ["hqq:3:32"], bf16=True)
    cells = [(row.label, *describe(row.scheme), row.dtype) for row in rows]
    assert cells[0] == ("float", "none", "none", "float32")
    assert ("float", "none", "none", "bfloat16") in cells
    for experts in (
        "hqq:3:64",
        "hqq:2:16",
        "hqq:4:64",
        "hqq:8:64",
        "bnb:nf4",
        "bnb:fp4",
        "bnb:int8",
        "hqq:3:32",
    ):
        assert ("attention + experts", "hqq:4:64", experts, "float32") in cells
    assert ("attention + experts", "hqq:4:64", "hqq:3:64", "bfloat16") in cells
    assert ("experts only", "none", "hqq:2:16", "float32") in cells
    assert ("attention only", "hqq:4:64", "none", "float32") in cells
    label, attention, experts, _ = cells[-1]
    assert label == f"profile `{PROFILE}`"
    assert (attention, experts) == ("hqq:4:64", "hqq:4:64")  # the shipped profiles' experts since issue 15


def test_describe_names_other_quantized_roles() -> None:
    scheme = QuantScheme.build(2, attention="hqq:4:64", experts="bnb:nf4", lm_head="bnb:int8")
    assert describe(scheme) == ("hqq:4:64", "bnb:nf4 (lm_head bnb:int8)")
    mixed = QuantScheme.build(2, experts="hqq:3:64", expert_overrides={-1: "hqq:4:64"})
    assert describe(mixed)[1] == "hqq:3:64, hqq:4:64"


def test_verdict_reads_the_fp32_row_of_the_bar() -> None:
    row = {"attention": "hqq:4:64", "experts": "hqq:3:64", "agreement": 0.95, "ppl_rise": 0.05}
    assert verdict([row | {"dtype": "bfloat16", "agreement": 0.1}, row | {"dtype": "float32"}]).endswith(
        ": met"
    )
    assert verdict([row | {"dtype": "float32", "agreement": 0.89}]).endswith("not met")
    assert verdict([row | {"dtype": "float32", "ppl_rise": 0.16}]).endswith("not met")
    assert verdict([row | {"dtype": "float32", "error": "group size"}]).endswith("not met")
