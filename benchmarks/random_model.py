"""A random Mixtral checkpoint big enough that a layer's compute is not noise, written once to a cache dir.

    python benchmarks/random_model.py --out /tmp/offload-bench/moe-1024

Weights are drawn like tests/baby.py's (normal, std 2 / sqrt(fan_in)), which sharpens the routing a
little over the default init. Routing of a random model is still near uniform, unlike a trained one:
cache hit rates and prefetch recall here are a floor, not what a real model gets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DEFAULT_DIR = Path("/tmp/offload-bench/moe-1024")
SHAPE = {  # Mixtral's structure (8 experts, top-2, GQA 4:1) at a width a CPU decodes in tens of ms
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
}


def write_random_model(
    directory: Path = DEFAULT_DIR, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> Path:
    """Write the model to ``directory`` unless a finished one is there; returns the directory."""
    from transformers import MixtralConfig, MixtralForCausalLM

    if (directory / "config.json").is_file():
        return directory
    config = MixtralConfig(
        **SHAPE, max_position_embeddings=4096, rope_parameters={"rope_theta": 1e6, "rope_type": "default"}
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = MixtralForCausalLM(config).to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 2 / parameter.shape[-1] ** 0.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="2GB")
    return directory


def write_random_tensors(
    directory: Path,
    shape: dict[str, int],
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    predictable: bool = False,
) -> Path:
    """The same kind of checkpoint without transformers: every tensor of offload's expected table,
    drawn on ``device`` (a GPU draws billions of weights in seconds), in the hub's config dialect.

    ``predictable``: every layer shares one router and the blocks write little into the residual
    stream (o_proj and w2 scaled by 1/1000), so the next layer's gate, applied to this layer's hidden
    state, nearly always guesses its experts: a control for measuring prefetching with right guesses.
    """
    from safetensors.torch import save_file

    from offload.checkpoint.reader import expected_tensors
    from offload.config import ModelConfig

    if (directory / "config.json").is_file():
        return directory
    raw = {
        "model_type": "mixtral",
        **shape,
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "rope_theta": 1e6,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    generator = torch.Generator(device).manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    shards = 0

    def flush() -> None:
        nonlocal shards
        shards += 1
        name = f"model-{shards:05d}.safetensors"
        save_file(shard, str(directory / name))
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    shared_gate = None
    for name, tensor_shape in expected_tensors(ModelConfig.from_dict(raw)).items():
        if len(tensor_shape) == 1:
            tensor = torch.ones(tensor_shape, dtype=dtype)
        else:
            std = 2 / tensor_shape[-1] ** 0.5
            if predictable and name.endswith(("o_proj.weight", "w2.weight")):
                std /= 1000
            tensor = (torch.randn(tensor_shape, generator=generator, device=device) * std).to(dtype).cpu()
            if predictable and name.endswith("gate.weight"):
                shared_gate = tensor if shared_gate is None else shared_gate
                tensor = shared_gate.clone()
        shard[name] = tensor
        if sum(t.numel() * t.element_size() for t in shard.values()) > 2**31:
            flush()
    if shard:
        flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(raw, indent=1))
    return directory


def describe(directory: Path) -> str:
    """One line: the shape and the size on disk."""
    config = json.loads((directory / "config.json").read_text())
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return (
        f"{directory}: hidden {config['hidden_size']}, FFN {config['intermediate_size']}, "
        f"{config['num_hidden_layers']} layers x {config['num_local_experts']} experts, vocab {config['vocab_size']}, "
        f"{size / 2**20:.0f} MiB of safetensors"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--hidden", type=int, help="with --ffn and --layers: another shape, written directly")
    parser.add_argument("--ffn", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--device", default="cpu", help="where to draw the weights of another shape")
    parser.add_argument(
        "--predictable", action="store_true", help="one router for every layer (see write_random_tensors)"
    )
    args = parser.parse_args()
    if args.hidden is None:
        print(describe(write_random_model(args.out)))
    else:
        shape = {
            **SHAPE,
            "hidden_size": args.hidden,
            "intermediate_size": args.ffn,
            "num_hidden_layers": args.layers,
            "num_attention_heads": args.hidden // 128,
            "num_key_value_heads": args.hidden // 512,
        }
        print(
            describe(write_random_tensors(args.out, shape, device=args.device, predictable=args.predictable))
        )
