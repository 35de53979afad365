"""The load flags: how the command line (or a caller) asks for a model to be placed and run.

One frozen object, declared once, that generate, chat, bench, trace record and a future server share.
Every field left None means "the profile's value, else the built-in default"; ``offload.settings.resolve``
turns the flags and the profile into ``RunSettings`` once per model. Nothing here imports torch, so the
CLI can build the object while ``--help`` stays instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from offload.errors import FlagError


@dataclass(frozen=True)
class LoadFlags:
    profile: str | None = None  # a profile name or a TOML path
    experts_per_layer: str | int | None = None  # K, 'K0,K1,...', 'all' or 'auto'
    prefetch: int | None = None  # guesses of the next layer's experts; 0 is off
    cache_policy: str | None = None  # lrfu or lru
    link: str | None = None  # local | emulated:GBPS[:LATENCY_US] | cuda
    host_compute: str | None = None  # auto | never | always: where cache misses are computed
    host_ratio: float | None = None  # emulate the host CPU as this many times the device's time per expert
    host_memory: float | None = None  # GiB of host RAM for experts (the host tier); the rest stay on disk
    disk: str | None = None  # how the host tier reads the checkpoint: file | emulated:GBPS
    quant: str | None = None  # only 'none': load a converted checkpoint's weights unquantized
    dtype: str | None = None  # float32, bfloat16 or float16
    device: str | None = None  # cpu, cuda or cuda:N
    threads: int | None = None  # torch's CPU threads; None picks from the free cores

    def replace(self, **changes: Any) -> LoadFlags:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    def given(self) -> dict[str, Any]:
        """The fields that were set, by name."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None
        }


FIELDS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(LoadFlags))


# What each flag that acts only on offloaded experts would act on, said when there is none of it.
NO_MISS = "no cache miss to place on the host"
NO_CACHE = "no expert cache to evict from"
NO_GUESS = "no expert to prefetch"
NO_COPY = "no expert to copy over a link"


def check_offload_flags(flags: LoadFlags, *, offloaded: bool, host_tier: bool, profile: str) -> None:
    """Refuse the flags given that act only on offloaded experts when the run keeps every expert resident.

    --host-compute and --host-ratio place cache misses, --cache-policy evicts from the cache, --link copies
    into it and --prefetch N guesses what to copy: with every expert resident (the cpu profile's default) there
    is none of these, and a flag ignored silently would let a user believe it acted. A profile's values for
    them are not refused: they are defaults that may serve another model or -k. ``--prefetch 0`` asks for what
    happens anyway; with a host tier (``host_tier``) the guesses read experts from disk ahead of their layer.
    """
    if offloaded:
        return
    given: dict[str, str] = {}  # the flag as given: what it would act on
    if flags.host_ratio is not None:
        given[f"--host-ratio {flags.host_ratio:g}"] = NO_MISS
    if flags.host_compute is not None:
        given[f"--host-compute {flags.host_compute}"] = NO_MISS
    if flags.cache_policy is not None:
        given[f"--cache-policy {flags.cache_policy}"] = NO_CACHE
    if flags.prefetch and not host_tier:
        given[f"--prefetch {flags.prefetch}"] = NO_GUESS
    if flags.link is not None:
        given[f"--link {flags.link}"] = NO_COPY
    if not given:
        return
    names, missing = list(given), list(dict.fromkeys(given.values()))
    where = "runs on the host from the host tier" if host_tier else "is resident"
    one = len(names) == 1
    raise FlagError(
        f"{_and(names)}: every expert {where} (profile {profile}), so there is {_and(missing)}; "
        f"{'it needs' if one else 'they need'} offloaded experts: add -k K (e.g. -k 4) "
        f"or leave {'the flag' if one else 'the flags'} out"
    )


def _and(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
