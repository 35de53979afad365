"""What the plan takes from the run it plans: the stored weights' scheme, the memory budget, the context, the
compute dtype and the host's cores, by the rules a run uses, and the one-line notices the plan prints where those rules change what it was
given.

``[host] cores = "auto"`` is this machine's: the threads a run here uses by default on an idle machine
(``offload.settings.threads``: OMP_NUM_THREADS when set, else the physical cores this process may run on; a
busy machine's run leaves out the cores its load takes, which a plan, made once, does not guess).

``offload.settings.plan`` re-exports these, so ``from offload.settings.plan import default_context`` keeps working.
"""

from __future__ import annotations

import os
from dataclasses import replace

from offload.config import ModelConfig
from offload.errors import ProfileError
from offload.quant.scheme import QuantScheme
from offload.settings import threads
from offload.settings.profile import Profile, ResolvedProfile

GIB = 1024**3
DEFAULT_CONTEXT = 4096  # tokens, when the profile gives no generation.context


def stored_scheme(config: ModelConfig, resolved: ResolvedProfile, source: str) -> tuple[QuantScheme, str]:
    """The stored weights' scheme and where it was read: a converted checkpoint's block wins over the profile."""
    if config.quantization is not None:
        return QuantScheme.from_block(config.quantization, config.num_hidden_layers, source), (
            f"{source}: quantization"
        )
    return QuantScheme.from_profile(resolved), f"{resolved.profile.source}: quant"


def budget_bytes(profile: Profile, free_memory_bytes: int | None) -> int:
    """The profile's memory budget, capped by the free memory when it is known."""
    limits = [int(profile.device.memory_gib * GIB)] if profile.device.memory_gib is not None else []
    if free_memory_bytes is not None:
        limits.append(free_memory_bytes)
    if not limits:
        raise ProfileError(
            f"{profile.source}: device.memory_gib is not set, so the budget is the free device memory; "
            "none was measured (pass --free-gib, e.g. --free-gib 11.5)"
        )
    return min(limits)


def requested_context(profile: Profile) -> int:
    """The profile's ``generation.context``, else 4096 tokens, before the model's window caps it."""
    return profile.generation.context or DEFAULT_CONTEXT


def default_context(config: ModelConfig, profile: Profile) -> int:
    """The profile's ``generation.context``, else 4096 tokens; never more than the model's window."""
    return min(requested_context(profile), config.max_position_embeddings)


def context_notice(config: ModelConfig, profile: Profile, context: int) -> str | None:
    """What the plan says when ``context`` is beyond the model's window, which caps it (as at load); else None."""
    window = config.max_position_embeddings
    if context <= window:
        return None
    whose = "the profile's generation.context" if context == profile.generation.context else "the context"
    return (
        f"context: {whose} of {context} tokens is capped at the model's {window} (its max_position_embeddings), "
        "as a run caps it"
    )


def run_dtype(
    config: ModelConfig, profile: Profile, scheme: QuantScheme, requested: str | None = None
) -> tuple[str, str | None]:
    """The compute dtype a run would use, and a notice when it is not the checkpoint's own.

    As ``offload.settings.resolve``: ``requested`` (``--dtype``); else on a CPU device without a host budget,
    for a float model (nothing quantized, not converted), ``cpu_compute_dtype`` (float32 for a small
    half-precision one); else the checkpoint's ``torch_dtype``.
    """
    if requested is not None:
        return requested, None
    stored = config.torch_dtype
    cpu_float = profile.device.kind == "cpu" and profile.host.memory_gib is None
    if not (cpu_float and scheme.is_float and config.quantization is None):
        return stored, None
    from offload.settings.resolve import cpu_compute_dtype  # deferred: resolve imports the plan

    chosen = cpu_compute_dtype(config) or stored
    if chosen == stored:
        return stored, None
    return chosen, (
        f"dtype: {chosen}, as a run on a CPU picks for a small {stored} float model (faster there); "
        "--dtype sets another"
    )


def local_cores() -> int:
    """The threads a run on this machine uses by default when it is idle (see the module docstring)."""
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) >= 1:
        return min(int(from_env), threads.available_cpus())
    return threads.physical_cores()


def with_cores(profile: Profile) -> tuple[Profile, str | None]:
    """``profile`` with ``[host] cores = "auto"`` made this machine's count, and what the plan says of it; a CPU
    device's explicit count that is not this machine's is kept and said."""
    cores = profile.host.cores
    if cores == "auto":
        here = local_cores()
        notice = f'host: {here} cores, as a run here uses them (the profile\'s cores = "auto")'
        return replace(profile, host=replace(profile.host, cores=here)), notice
    if profile.device.kind == "cpu" and cores != (here := local_cores()):
        return profile, (
            f"host: the profile's {cores} cores; a run on this machine uses {here} "
            '(cores = "auto" plans for this machine)'
        )
    return profile, None


def fill_slots(room: int, expert_bytes: tuple[int, ...], experts: int, profile: Profile) -> list[int]:
    """Hand out slots one layer at a time, fewest slots first, while they fit in ``room`` bytes."""
    ks, need = [1] * len(expert_bytes), sum(expert_bytes)
    if room < need:
        raise ProfileError(
            f'{profile.source}: cache.experts_per_layer = "auto": the budget leaves {max(room, 0) / GIB:.2f} GiB '
            f"for experts, and one per layer needs {need / GIB:.2f} GiB; use a smaller --context or more memory"
        )
    room -= need
    while True:
        grown = False
        for layer in sorted(range(len(ks)), key=lambda i: (ks[i], i)):
            if ks[layer] < experts and expert_bytes[layer] <= room:
                ks[layer] += 1
                room -= expert_bytes[layer]
                grown = True
                break
        if not grown:
            return ks
