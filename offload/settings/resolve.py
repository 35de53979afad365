"""Run settings: a profile, overridden by command-line flags, resolved against one model.

Order of precedence, as in llama.cpp and ollama: an explicit flag, then the profile, then the
built-in default. The result says where every weight goes and how to generate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from offload.checkpoint.reader import expected_tensors
from offload.config import ModelConfig
from offload.errors import CacheError, FlagError, ProfileError
from offload.experts.cache import slot_counts
from offload.experts.disk import parse_disk
from offload.experts.link import parse_link
from offload.experts.policy import CACHE_POLICIES
from offload.hybrid import CostOverrides, uses_host
from offload.loading import OffloadOptions, parse_device, parse_dtype
from offload.quant.scheme import QuantScheme
from offload.settings.flags import LoadFlags
from offload.settings.plan import resolve_auto_experts
from offload.settings.profile import load_profile
from offload.settings.threads import check_threads, default_threads


@dataclass(frozen=True)
class RunSettings:
    device: torch.device
    dtype: str | None  # None: the checkpoint's own dtype
    quant: QuantScheme
    offload: OffloadOptions
    profile_name: str
    generation: Any  # the profile's GenerationSettings: defaults for flags left unset
    threads: int = 1  # torch's CPU threads

    def with_offload(self, **changes: Any) -> RunSettings:
        """A copy whose OffloadOptions have ``changes`` (bench and trace record derive theirs this way)."""
        return dataclasses.replace(self, offload=dataclasses.replace(self.offload, **changes))


def parse_experts_per_layer(text: str | int | None) -> int | list[int] | str | None:
    """'2' -> 2, '2,3,2' -> [2, 3, 2], 'all' / 'auto' kept; anything else is a CacheError."""
    if text is None or isinstance(text, int):
        return text
    text = text.strip()
    if text in ("all", "auto"):
        return text
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise CacheError(
            f"--experts-per-layer {text!r} is not an integer, a comma list of integers, 'all' or 'auto'"
        ) from None
    return values[0] if len(values) == 1 else values


def resolve_settings(
    config: ModelConfig,
    flags: LoadFlags | None = None,
    *,
    attention_spec: str | None = None,
    experts_spec: str | None = None,
    free_memory_bytes: int | None = None,
) -> RunSettings:
    """Merge the profile (default: cpu without CUDA, auto with it) and ``flags`` for ``config``.

    Every flag is checked here, against the model's config.json where it must be (``-k`` against its
    experts), so that a typo fails before a weight is read.
    """

    flags = flags or LoadFlags()
    profile, device, dtype, quant = flags.profile, flags.device, flags.dtype, flags.quant
    prefetch, cache_policy, link = flags.prefetch, flags.cache_policy, flags.link
    chosen = load_profile(profile)
    resolved = chosen.for_model(config)
    run_device = _run_device(device, profile, chosen.device.kind)

    if quant is not None and quant != "none":
        raise FlagError(
            f"--quant {quant!r}: only 'none' is allowed (load the weights unquantized); to quantize, convert "
            "the model once: offload convert SRC DST --attention SPEC --experts SPEC"
        )
    if config.quantization is not None or quant == "none":
        scheme = QuantScheme()  # a converted checkpoint brings its own scheme; --quant none turns it off
    else:
        scheme = QuantScheme.from_profile(resolved)
    if attention_spec or experts_spec:
        base = scheme
        scheme = QuantScheme.build(
            config.num_hidden_layers,
            attention=attention_spec or str(base.attention),
            experts=experts_spec or str(base.expert_spec(0)),
        )

    slots = parse_experts_per_layer(flags.experts_per_layer)
    if slots is None:
        profile_slots = chosen.cache.experts_per_layer
        slots = profile_slots if profile_slots in ("all", "auto") else list(resolved.experts_per_layer)
    if slots == "auto":
        slots = _auto_slots(config, chosen, run_device, free_memory_bytes)
    if slots == "all":
        slots = None  # every expert resident: no store, no cache, nothing moved
    else:
        where = "--experts-per-layer" if flags.experts_per_layer is not None else "cache.experts_per_layer"
        slot_counts(slots, config.num_hidden_layers, config.num_local_experts, where)  # fail before loading
    if prefetch is None:  # a profile's guesses are capped at what the model has
        prefetch = min(chosen.prefetch.experts, config.num_local_experts) if chosen.prefetch.enabled else 0
    if isinstance(prefetch, bool) or not 0 <= prefetch <= config.num_local_experts:
        raise CacheError(
            f"--prefetch {prefetch} is out of range: 0 (off) to {config.num_local_experts} (the experts per layer)"
        )
    cache_policy = cache_policy or chosen.cache.policy
    if cache_policy not in CACHE_POLICIES:
        raise CacheError(f"--cache-policy {cache_policy!r} is not one of {', '.join(CACHE_POLICIES)}")
    link = link or ("cuda" if run_device.type == "cuda" else "local")
    _check_link(link)
    host_compute = flags.host_compute or chosen.host.compute
    uses_host(host_compute, run_device, flags.host_ratio)  # a bad --host-compute fails before loading
    if flags.host_ratio is not None and not flags.host_ratio > 0:
        raise CacheError(f"--host-ratio must be > 0, got {flags.host_ratio}")
    parse_dtype(dtype, config)  # a bad --dtype fails here, before loading
    host_memory, disk = _host_tier(flags, chosen.host.memory_gib)
    # A budget from the profile is named in errors as its file and key: the user gave no --host-memory.
    from_profile = flags.host_memory is None and host_memory is not None
    if (
        dtype is None
        and host_memory is None  # the tier reads experts as stored: the stored dtype it is
        and run_device.type == "cpu"
        and scheme.is_float
        and config.quantization is None
    ):
        dtype = cpu_compute_dtype(config)
    return RunSettings(
        device=run_device,
        dtype=dtype,
        quant=scheme,
        offload=OffloadOptions(
            experts_per_layer=slots,
            prefetch=prefetch,
            cache_policy=cache_policy,
            link=link,
            host_compute=host_compute,
            host_ratio=flags.host_ratio,
            host_costs=_host_costs(chosen.host),
            host_memory_gib=host_memory,
            host_memory_where=f"{chosen.source}: host.memory_gib = {host_memory}" if from_profile else None,
            disk=disk,
            host_policy=chosen.host.policy,
        ),
        profile_name=chosen.name,
        generation=chosen.generation,
        threads=default_threads() if flags.threads is None else check_threads(flags.threads),
    )


def _run_device(flag: str | None, profile: str | None, kind: str) -> torch.device:
    """--device, else the device.kind of a profile given by --profile, else CUDA when there is one.

    A profile's CUDA on a machine without it is named as the profile's key: the user gave no --device.
    """
    if flag is not None or profile is None:
        return parse_device(flag)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ProfileError(
            f'profile {profile} sets device.kind = "cuda", and CUDA is not available on this machine; '
            "use --device cpu or --profile cpu"
        )
    return parse_device(kind)


def _host_tier(flags: LoadFlags, profile_gib: float | None) -> tuple[float | None, str]:
    """The host tier's budget (None: off) and disk, from the flags, else the profile's [host] memory_gib.

    With every expert "resident" (``slots`` None) and a budget, the experts run on the host CPU from the tier,
    on any device (llama.cpp's ``--cpu-moe`` over a memory-mapped file; ``offload.loading``).
    """
    budget = flags.host_memory if flags.host_memory is not None else profile_gib
    if budget is not None and not (0 < budget < float("inf")):
        raise FlagError(f"--host-memory {budget} is out of range: above 0 GiB")
    disk = flags.disk or "file"
    parse_disk(disk).close()  # a malformed --disk fails before loading
    if flags.disk is not None and budget is None:
        raise FlagError(
            f"--disk {flags.disk} sets how the host tier reads experts, and there is no tier: "
            "give --host-memory GiB too (or [host] memory_gib in the profile)"
        )
    return budget, disk


def _host_costs(host: Any) -> CostOverrides | None:
    """The cost-model inputs a profile's [host] table gives instead of measuring them, if any."""
    if host.expert_ms is None and host.device_expert_ms is None:
        return None
    return CostOverrides(host_expert_ms=host.expert_ms, device_expert_ms=host.device_expert_ms)


def _auto_slots(
    config: ModelConfig, profile: Any, device: torch.device, free_memory_bytes: int | None
) -> list[int] | str:
    """Fill the free device memory with expert slots (all of them on a CPU device)."""
    if device.type != "cuda" and free_memory_bytes is None:
        return "all"
    if free_memory_bytes is None:
        free_memory_bytes, _ = torch.cuda.mem_get_info(device)
    return resolve_auto_experts(config, profile, free_memory_bytes)


def _check_link(spec: str) -> None:
    """A malformed --link is an error even when every expert is resident and no link is used."""
    parse_link(spec).close()


SMALL_MODEL_PARAMETERS = 250_000_000  # 1 GB in float32


def parameter_count(config: ModelConfig) -> int:
    """Every weight of the model, from the one table of its tensors."""
    return sum(math.prod(shape) for shape in expected_tensors(config).values())


def cpu_compute_dtype(config: ModelConfig) -> str | None:
    """float32 for a small half-precision checkpoint on a CPU, else None (the checkpoint's own dtype).

    CPUs without bf16 units run a bf16 matrix-vector product about 3x slower than an fp32 one (FACTS),
    and at this size float32 costs little RAM.
    """
    if config.torch_dtype in ("bfloat16", "float16") and parameter_count(config) <= SMALL_MODEL_PARAMETERS:
        return "float32"
    return None
