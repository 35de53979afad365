"""Random baby Mixtral checkpoints in the hub's format, made at test time with transformers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class BabySpec:
    """One baby architecture plus how it is written to disk."""

    name: str
    hidden_size: int = 64
    intermediate_size: int = 96
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    vocab_size: int = 128
    head_dim: int | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    dialect: str = "transformers5"  # or "hub": top-level rope_theta and torch_dtype
    max_shard_size: str | None = None  # set: sharded with an index json
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


BABIES = [
    BabySpec("single-t5", hidden_size=64, intermediate_size=96, vocab_size=128),
    BabySpec(
        "sharded-hub-odd",
        hidden_size=36,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=101,
        dialect="hub",
        max_shard_size="20KB",
        seed=1,
    ),
    BabySpec(
        "sharded-tied-window",
        hidden_size=72,
        intermediate_size=50,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=97,
        sliding_window=7,
        tie_word_embeddings=True,
        max_shard_size="30KB",
        seed=2,
    ),
]


def reference_model(spec: BabySpec):
    """The transformers oracle with random weights (fp32, eager attention)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        num_local_experts=spec.num_local_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        head_dim=spec.head_dim,
        sliding_window=spec.sliding_window,
        tie_word_embeddings=spec.tie_word_embeddings,
        rope_parameters={"rope_theta": spec.rope_theta, "rope_type": "default"},
        max_position_embeddings=512,
        attn_implementation="eager",
        experts_implementation="eager",
        **spec.extra,
    )
    torch.manual_seed(spec.seed)
    model = MixtralForCausalLM(config)
    # Random init gives near-uniform routing and tiny logits; larger weights make the test sharper.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.5 / param.shape[-1] ** 0.5 * 4)
    return model.eval()


def write_baby(spec: BabySpec, directory: Path):
    """Save the oracle to ``directory`` in the spec's dialect and return the oracle."""
    model = reference_model(spec)
    kwargs = {} if spec.max_shard_size is None else {"max_shard_size": spec.max_shard_size}
    model.save_pretrained(directory, **kwargs)
    if spec.dialect == "hub":
        config_path = directory / "config.json"
        raw = json.loads(config_path.read_text())
        raw["rope_theta"] = raw.pop("rope_parameters")["rope_theta"]
        raw["torch_dtype"] = raw.pop("dtype")
        if raw.get("head_dim") is None:
            raw.pop("head_dim", None)
        config_path.write_text(json.dumps(raw, indent=2))
    return model
