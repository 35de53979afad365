"""Building a ready-to-run MixtralModel from a checkpoint directory or repo id."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from offload.checkpoint import Checkpoint, expected_tensors, expert_prefix, resolve_model_dir
from offload.config import ModelConfig
from offload.errors import OffloadError
from offload.expert_source import DenseExpert, Expert, ResidentExperts
from offload.model import MixtralModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None, config: ModelConfig) -> torch.dtype:
    """A dtype name (or None: the checkpoint's own dtype) as a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    name = name or config.torch_dtype
    if name not in DTYPES:
        raise OffloadError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str | torch.device | None) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N'; CUDA must be present."""
    text = str(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise OffloadError(f"--device {text!r} is not one of cpu, cuda, cuda:N")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise OffloadError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
    return torch.device(text)


def load_model(
    model: str | Path,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
) -> MixtralModel:
    """Load ``model`` (a directory or a Hugging Face repo id) with every expert resident on ``device``."""
    checkpoint = Checkpoint(resolve_model_dir(model))
    config = checkpoint.config
    device, dtype = parse_device(device), parse_dtype(dtype, config)
    checkpoint.check(expected_tensors(config))
    with torch.device("meta"):
        mixtral = MixtralModel(config)
    load_dense_weights(mixtral, checkpoint, device, dtype)
    experts: list[list[Expert]] = []
    for layer in range(config.num_hidden_layers):
        experts.append([])
        for expert in range(config.num_local_experts):
            prefix = expert_prefix(layer, expert)
            w1, w2, w3 = (
                checkpoint.get(f"{prefix}.{w}.weight").to(device, dtype) for w in ("w1", "w2", "w3")
            )
            experts[layer].append(DenseExpert(w1, w2, w3))
    attach_source(mixtral, ResidentExperts(experts))
    return mixtral.eval()


def load_dense_weights(
    mixtral: MixtralModel, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype
) -> None:
    """Fill every parameter of ``mixtral`` (built on the meta device) from the checkpoint, one tensor at a time."""
    for name, _ in list(mixtral.named_parameters()):
        if name == "lm_head.weight" and mixtral.config.tie_word_embeddings:
            continue
        set_parameter(mixtral, name, checkpoint.get(name).to(device, dtype))
    if mixtral.config.tie_word_embeddings:
        mixtral.lm_head.weight = mixtral.model.embed_tokens.weight


def set_parameter(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter called ``name`` (dotted) with ``value``, frozen."""
    owner_name, _, attribute = name.rpartition(".")
    owner = root.get_submodule(owner_name)
    setattr(owner, attribute, nn.Parameter(value, requires_grad=False))


def attach_source(mixtral: MixtralModel, source: object) -> None:
    """Give every MoE block the same ExpertSource."""
    for layer in mixtral.model.layers:
        layer.block_sparse_moe.source = source
    mixtral.expert_source = source
