"""Building a ready-to-run MixtralModel from a checkpoint directory or repo id.

Dense weights go to the device (quantized per role when the scheme says so). Experts either all
go to the device (``ResidentExperts``) or into the host store behind a per-layer device cache
(``OffloadedExperts``). Either way each expert is encoded once, by the same codec, so both give
bit-identical outputs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from offload.checkpoint.expert_reads import tier_reads
from offload.checkpoint.hub import resolve_model_dir
from offload.checkpoint.reader import Checkpoint
from offload.checkpoint.weights import ATTENTION, WeightReader, parse_dtype, reader_for
from offload.errors import OffloadError
from offload.experts.cache import ExpertCache
from offload.experts.disk import parse_disk
from offload.experts.host import ThreadHost
from offload.experts.host_only import HostOnlyExperts, InlineHost
from offload.experts.host_tier import HostTier
from offload.experts.link import parse_link
from offload.experts.offloaded import OffloadedExperts
from offload.experts.policy import DEFAULT_CACHE_POLICY, DEFAULT_HOST_POLICY
from offload.experts.source import Expert, ExpertSource, ResidentExperts, prefers_input_major
from offload.experts.stacked import ExpertStack
from offload.experts.store import HostForm, HostStore
from offload.huge_pages import into_huge_pages
from offload.hybrid import CostOverrides, build_host_path, host_materializer, uses_host
from offload.memory_release import release_freed_memory
from offload.model import MixtralModel
from offload.quant.codec import ExpertCodec, codec_for
from offload.quant.device_kernels import kernel_works
from offload.quant.linear import build_linear
from offload.quant.scheme import QuantScheme

Progress = Callable[[str, int], None]  # (what was just loaded, its bytes)


@dataclass(frozen=True)
class OffloadOptions:
    """How experts are offloaded; ``experts_per_layer`` None keeps every expert on the device."""

    experts_per_layer: int | Sequence[int] | None = None  # K device slots per layer (int or one per layer)
    prefetch: int = 2  # guesses of the next layer's experts; 0 turns prefetching off
    cache_policy: str = DEFAULT_CACHE_POLICY  # which expert a full layer evicts (offload.experts.policy)
    link: str = "local"  # local | emulated:GBPS[:LATENCY_US] | cuda
    host_compute: str = "auto"  # auto (the cost model), never (copy every miss), always (host)
    host_ratio: float | None = None  # emulate the host as this many times the device's time per expert
    host_costs: CostOverrides | None = None  # cost-model inputs a profile gives instead of measuring them
    host_memory_gib: float | None = None  # the host tier's budget for experts; None holds every expert in RAM
    # How errors name the budget: a profile's "FILE: host.memory_gib = 8" when it set it (None: --host-memory 8).
    host_memory_where: str | None = None
    disk: str = "file"  # how the host tier reads: file | emulated:GBPS
    host_policy: str = DEFAULT_HOST_POLICY  # which expert the host tier evicts (offload.experts.policy)


def parse_device(name: str | torch.device | None) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N'; CUDA must be present."""
    text = str(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise OffloadError(f"--device {text!r} is not one of cpu, cuda, cuda:N")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise OffloadError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
    return torch.device(text)


def load_model(
    model: str | Path | Checkpoint,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    quant: QuantScheme | None = None,
    offload: OffloadOptions | None = None,
    progress: Progress | None = None,
    host_kernels: bool = True,
) -> MixtralModel:
    """Load ``model`` (a directory, a Hugging Face repo id, or a Checkpoint already opened).

    ``quant`` quantizes a float checkpoint at load time (a converted checkpoint uses its own scheme);
    ``offload`` keeps experts in host RAM behind a device cache instead of all on the device.
    On a CPU device, weights whose spec has a CPU kernel (``hqq:4:G``, ``bnb:int8``) stay quantized and run it;
    ``host_kernels=False`` dequantizes every quantized weight to dense ``dtype`` at load instead.
    """
    checkpoint = model if isinstance(model, Checkpoint) else Checkpoint(resolve_model_dir(model))
    config = checkpoint.config
    device, dtype = parse_device(device), parse_dtype(dtype, config)
    reader = reader_for(checkpoint, quant, dtype)
    reader.check()
    with torch.device("meta"):
        mixtral = MixtralModel(config)
    load_dense_weights(mixtral, reader, device, progress, host_kernels=host_kernels)
    mixtral.fuse_projections()
    if device.type == "cpu":
        move_into_huge_pages(mixtral.dense_weights())
    if offload is not None and offload.experts_per_layer is None and offload.host_memory_gib is not None:
        source = load_host_tier_experts(mixtral, reader, device, offload, host_kernels=host_kernels)
    elif offload is None or offload.experts_per_layer is None:
        source = ResidentExperts(*load_resident_experts(reader, device, progress, host_kernels=host_kernels))
    else:
        source = load_offloaded_experts(mixtral, reader, device, offload, progress, host_kernels=host_kernels)
    attach_source(mixtral, source)
    mixtral.quant_scheme = reader.scheme
    return mixtral.eval()


def move_into_huge_pages(weights: list[tuple[nn.Module, str, Tensor]], block_bytes: int = 32 << 20) -> None:
    """Each ``module.name`` replaced by the same tensor (values, strides, sharing) in 2 MiB pages.

    Small weights share blocks of about ``block_bytes``, so that they too sit in huge pages; the originals of
    each block are freed, and their heap pages handed back, before the next block is filled, so the load's peak
    RSS grows by one block or one tensor, not by every dense weight.
    """
    groups: dict[int, list[tuple[nn.Module, str, Tensor]]] = {}  # storage -> the weights over it, in order
    for weight in weights:
        groups.setdefault(weight[2].untyped_storage().data_ptr(), []).append(weight)
    del weights[:]
    pending = deque(groups.values())  # popped as they are moved: nothing here keeps an original alive
    groups.clear()
    block: list[tuple[nn.Module, str, Tensor]] = []
    filled = 0
    while pending or block:
        size = pending[0][0][2].untyped_storage().nbytes() if pending else 0
        if block and (not pending or filled + size > block_bytes):
            moved = into_huge_pages([tensor for _, _, tensor in block])
            for (module, name, tensor), new in zip(block, moved, strict=True):
                # A new tensor, not ``tensor.data = new``: an input-major view would keep its old base alive.
                setattr(
                    module,
                    name,
                    nn.Parameter(new, requires_grad=False) if isinstance(tensor, nn.Parameter) else new,
                )
            del moved, tensor
            block, filled = [], 0
            release_freed_memory()
            continue
        block += pending.popleft()
        filled += size


def load_dense_weights(
    mixtral: MixtralModel,
    reader: WeightReader,
    device: torch.device,
    progress: Progress | None = None,
    *,
    host_kernels: bool = True,
) -> None:
    """Fill every non-expert weight of ``mixtral`` (built on the meta device), one tensor at a time."""
    config, scheme = mixtral.config, reader.scheme
    quantized: dict[str, object] = {}
    for layer in range(config.num_hidden_layers):
        for name in ATTENTION:
            quantized[f"model.layers.{layer}.self_attn.{name}"] = scheme.attention
        quantized[f"model.layers.{layer}.block_sparse_moe.gate"] = scheme.gate
    if not config.tie_word_embeddings:
        quantized["lm_head"] = scheme.lm_head
    for module, spec in quantized.items():
        tensors = reader.linear(module, spec)
        owner_name, _, attribute = module.rpartition(".")
        owner = mixtral.get_submodule(owner_name) if owner_name else mixtral
        setattr(
            owner, attribute, build_linear(tensors, spec, reader.dtype, device, host_kernels=host_kernels)
        )
        _report(progress, module, tensors)
    for name, parameter in list(mixtral.named_parameters()):
        if parameter.is_meta and not name.startswith("lm_head"):
            tensor = reader.dense(name).to(device)
            set_parameter(mixtral, name, tensor)
            _report(progress, name, {"": tensor})
    if config.tie_word_embeddings:
        mixtral.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
        mixtral.lm_head.weight = mixtral.model.embed_tokens.weight


def load_resident_experts(
    reader: WeightReader,
    device: torch.device,
    progress: Progress | None = None,
    *,
    host_kernels: bool = True,
) -> tuple[list[list[Expert]], list[ExpertStack | None]]:
    """Every expert materialized on the device, and per layer the stack that pairs its experts (or None)."""
    config = reader.checkpoint.config
    experts: list[list[Expert]] = []
    stacks: list[ExpertStack | None] = []
    for layer in range(config.num_hidden_layers):
        codec = codec_for(reader.scheme.expert_spec(layer), host_kernels=host_kernels)
        experts.append([])
        stack = ExpertStack(config.num_local_experts)
        for expert in range(config.num_local_experts):
            tensors = reader.expert(layer, expert)
            # Fused (into the layer's stack where it fits) here rather than in ResidentExperts, so that the
            # unfused copy is freed (and trimmed) now.
            experts[layer].append(stack.add(expert, codec.materialize(tensors, reader.dtype, device)))
            _report(progress, f"layers.{layer}.experts.{expert}", tensors)
            del tensors
            release_freed_memory()
        stacks.append(stack.check())
    return experts, stacks


def load_offloaded_experts(
    mixtral: MixtralModel,
    reader: WeightReader,
    device: torch.device,
    options: OffloadOptions,
    progress: Progress | None = None,
    *,
    host_kernels: bool = True,
) -> ExpertSource:
    """Every expert packed into the host store (or, with a host budget, the host tier over the checkpoint on
    disk), behind a K-slot cache per layer on the device."""
    config = mixtral.config
    codecs = [
        codec_for(reader.scheme.expert_spec(layer), host_kernels=host_kernels)
        for layer in range(config.num_hidden_layers)
    ]
    if options.host_memory_gib is not None:
        # The tier converts its reads to the host form where the host may compute from them.
        computes = device.type == "cpu" or uses_host(options.host_compute, device, options.host_ratio)
        store: HostStore | HostTier = open_host_tier(
            reader, device, options, host_forms=host_forms(codecs, device) if computes else None
        )
    else:
        store = HostStore(
            config.num_hidden_layers,
            config.num_local_experts,
            device=device,
            input_major=prefers_input_major(reader.dtype),
            host_forms=host_forms(codecs, device),
        )
        for layer in range(config.num_hidden_layers):
            for expert in range(config.num_local_experts):
                tensors = reader.expert(layer, expert)
                store.put(layer, expert, tensors)  # packed straight into the store; ``tensors`` is dropped
                _report(progress, f"layers.{layer}.experts.{expert}", tensors)
                del tensors
                release_freed_memory()
        store.check_complete()
    materialize = [_materializer(codec, reader.dtype, device) for codec in codecs]
    link = parse_link(options.link)
    cache = ExpertCache(
        store, options.experts_per_layer, link, materialize, device=device, policy=options.cache_policy
    )
    gates = [layer.block_sparse_moe.gate for layer in mixtral.model.layers]
    host_path = build_host_path(
        store,
        codecs,
        link,
        dtype=reader.dtype,
        device=device,
        hidden_size=config.hidden_size,
        mode=options.host_compute,
        host_ratio=options.host_ratio,
        overrides=options.host_costs,
    )
    store.reset_stats()  # the probes' reads are the load's, not the run's
    return OffloadedExperts(cache, gates, prefetch=options.prefetch, host_path=host_path)


def host_forms(codecs: Sequence[ExpertCodec], device: torch.device) -> list[HostForm] | None:
    """What the host store keeps each layer's experts as: the codec's host form (``offload.quant.host_form``;
    4-bit experts in the CPU kernel's layout), so host jobs and a CPU device compute from the store's bytes
    without building anything; None (the stored form) on a GPU where torch's int4 kernel does not run, whose
    fallback, hqq's HQQLinear, reads the stored layout."""
    if device.type == "cuda" and not kernel_works(device):
        return None
    return [codec.host_form for codec in codecs]


def open_host_tier(
    reader: WeightReader,
    device: torch.device,
    options: OffloadOptions,
    build: Sequence[Callable] | None = None,
    host_forms: Sequence[HostForm] | None = None,
) -> HostTier:
    """The host tier over ``reader``'s checkpoint with ``options``' budget and disk; reads no expert yet.

    The budget must hold one token's experts of a layer (``num_experts_per_tok``). ``build`` (one materialize
    per layer) makes a tier that only the host computes from: each expert is built in its slot as it is read.
    ``host_forms`` (``host_forms``'s) makes one that converts each read to the host form in its slot instead.
    """
    assert options.host_memory_gib is not None
    where = options.host_memory_where or f"--host-memory {options.host_memory_gib:g}"
    layouts, reads = tier_reads(reader, where)
    return HostTier(
        layouts,
        reads,
        int(options.host_memory_gib * 2**30),
        parse_disk(options.disk),
        device=device,
        policy=options.host_policy,
        min_slots=reader.checkpoint.config.num_experts_per_tok,
        build=build,
        host_forms=host_forms,
        where=where,
    )


def load_host_tier_experts(
    mixtral: MixtralModel,
    reader: WeightReader,
    device: torch.device,
    options: OffloadOptions,
    *,
    host_kernels: bool = True,
) -> ExpertSource:
    """A host budget with every expert "resident": each expert computed by the host kernels straight from the
    host tier, so RAM holds the budget's experts, not all of them (llama.cpp's mmap case). On a CPU device the
    host is the device and computes inline; on a GPU only the activations cross, as llama.cpp's ``--cpu-moe``.
    """
    config = mixtral.config
    materialize = [
        host_materializer(
            codec_for(reader.scheme.expert_spec(layer), host_kernels=host_kernels), reader.dtype
        )
        for layer in range(config.num_hidden_layers)
    ]
    # Nothing is copied from this tier to the device, so it is never pinned.
    tier = open_host_tier(reader, torch.device("cpu"), options, build=materialize)
    gates = [layer.block_sparse_moe.gate for layer in mixtral.model.layers]
    host = InlineHost() if device.type == "cpu" else ThreadHost()
    return HostOnlyExperts(tier, host, materialize, gates, prefetch=options.prefetch)


def _materializer(codec: object, dtype: torch.dtype, device: torch.device) -> Callable:
    return lambda tensors: codec.materialize(tensors, dtype, device)


def _report(progress: Progress | None, what: str, tensors: dict[str, torch.Tensor]) -> None:
    if progress is not None:
        progress(what, sum(t.numel() * t.element_size() for t in tensors.values()))


def set_parameter(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter called ``name`` (dotted) with ``value``, frozen."""
    owner_name, _, attribute = name.rpartition(".")
    owner = root.get_submodule(owner_name)
    setattr(owner, attribute, nn.Parameter(value, requires_grad=False))


def attach_source(mixtral: MixtralModel, source: ExpertSource) -> None:
    """Give every MoE block the same ExpertSource."""
    for layer in mixtral.model.layers:
        layer.block_sparse_moe.source = source
    mixtral.expert_source = source
