"""A profile's TOML tables read into frozen settings: every value checked, and every error one line
naming the file, the dotted key, the value and what is allowed. ``offload.settings.profile`` assembles them.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offload.errors import ProfileError, QuantError
from offload.experts.policy import (
    CACHE_POLICIES,
    DEFAULT_CACHE_POLICY,
    DEFAULT_HOST_POLICY,
    HOST_TIER_POLICIES,
)
from offload.quant.spec import QuantSpec
from offload.settings.limits import MAX_TOP_K, TEMPERATURES, temperature_allowed

DEVICE_KINDS = ("cuda", "cpu")
# "all" keeps every expert on the device: the CPU profile's K, whatever E the model has.
K_WORDS = ("auto", "all")
K_ALLOWED = "a positive integer, 'auto', 'all', or a list with one positive integer per layer"
QUANT_ROLES = ("attention", "experts", "gate", "embed", "lm_head")
# 4-bit g64 experts, as every shipped profile: a host (CPU) kernel and a GPU int4 layout (docs/BENCHMARKS.md).
_DEFAULT_QUANT = {"attention": "hqq:4:64", "experts": "hqq:4:64", "gate": "none", "embed": "none"}
_DEFAULT_LINK_GBPS = {"cuda": 12.0, "cpu": 20.0}


@dataclass(frozen=True)
class DeviceSettings:
    kind: str  # "cuda" or "cpu": where attention, the KV cache and the expert slots live
    memory_gib: float | None  # budget for dense weights + expert slots + KV + workspace; None = free memory
    link_gbps: float  # host→device bandwidth in GB/s (1e9 bytes/s), for the plan and EmulatedLink
    memory_gbps: float | None = None  # the device memory's bandwidth in GB/s (its datasheet's), for the plan
    # the GPU's CUDA compute capability (8.6 for an RTX 3060), for the plan: torch's int4 kernel needs 8.0; None
    # when unknown (the "auto" profile), and the plan then counts on no int4 kernel. At run time it is probed.
    compute_capability: float | None = None


@dataclass(frozen=True)
class CacheSettings:
    experts_per_layer: int | str | tuple[int, ...]  # K: an int, "auto", "all", or one int per layer
    policy: str = DEFAULT_CACHE_POLICY  # which expert a full layer evicts: offload.experts.policy


@dataclass(frozen=True)
class PrefetchSettings:
    enabled: bool  # guess the next layer's experts from the current hidden state
    experts: int  # guesses per next layer


@dataclass(frozen=True)
class QuantSettings:
    attention: str  # spec for q, k, v, o projections, e.g. "hqq:4:64"
    experts: str  # spec for w1, w2, w3 of every expert unless overridden
    experts_overrides: tuple[tuple[int, str], ...] = ()  # (layer, spec); layer -1 is the last one
    gate: str = "none"  # the router; 16-bit by default because routing is sensitive to it
    embed: str = "none"  # the token embedding
    lm_head: str = "none"  # the output projection; follows embed when omitted


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 512  # stop after this many new tokens
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9  # nucleus sampling mass, in (0, 1]
    top_k: int = 0  # keep the k likeliest tokens; 0 = off
    context: int | None = None  # KV cache length in tokens; None = the caller's default


HOST_COMPUTE_MODES = ("auto", "never", "always")  # offload.experts.cost_model's, without importing torch


@dataclass(frozen=True)
class HostSettings:
    """The host CPU beside the device: what computes cache misses in hybrid execution, and the plan's host."""

    cores: int | str = (
        4  # physical cores the host kernels may use; "auto": this machine's (the plan counts them)
    )
    memory_gbps: float = 50.0  # DDR bandwidth in GB/s (dual-channel DDR4/DDR5: 40 to 80)
    compute: str = "auto"  # where misses run by default: auto, never or always (--host-compute wins)
    expert_ms: float | None = None  # the host's time for one expert at one token, instead of measuring it
    device_expert_ms: float | None = None  # the device's, likewise
    memory_gib: float | None = None  # host RAM for experts; the rest stay on disk (None: every expert in RAM)
    disk_gbps: float = 3.0  # the disk's read bandwidth in GB/s, for the plan (a laptop NVMe SSD: 2 to 7)
    policy: str = DEFAULT_HOST_POLICY  # which expert the host tier evicts: cyclic, lrfu or lru


class ProfileTable:
    """One TOML table of a profile; every error names the file and the dotted key."""

    def __init__(self, raw: Any, source: Path, prefix: str, allowed: tuple[str, ...]) -> None:
        self.source, self.prefix = source, prefix
        if not isinstance(raw, dict):
            self.fail("", raw, f"a table [{prefix.rstrip('.')}]")
        for key in raw:
            if key not in allowed:
                where = f"in [{prefix.rstrip('.')}]" if prefix else "at the top level"
                raise ProfileError(
                    f"{source}: unknown key {prefix}{key} = {show_value(raw[key])}; "
                    f"allowed keys {where}: {', '.join(allowed)}"
                )
        self.raw: dict[str, Any] = raw

    def fail(self, key: str, value: Any, allowed: str) -> None:
        name = f"{self.prefix}{key}".rstrip(".")
        shown = "is missing" if value is None else f"= {show_value(value)}"
        raise ProfileError(f"{self.source}: {name} {shown}: allowed is {allowed}")

    def table(self, key: str) -> ProfileTable:
        return ProfileTable(self.raw.get(key, {}), self.source, f"{self.prefix}{key}.", SECTIONS[key])

    def string(self, key: str, default: str | None, choices: tuple[str, ...] = ()) -> Any:
        value = self.raw.get(key, default)
        if not isinstance(value, str) or (choices and value not in choices):
            self.fail(key, value, " or ".join(repr(c) for c in choices) if choices else "a string")
        return value

    def number(self, key: str, default: float | None, check: Callable[[float], bool], allowed: str) -> Any:
        if key not in self.raw and default is None:
            return None
        value = self.raw.get(key, default)
        # TOML has inf and nan; neither is a budget, a bandwidth or a temperature.
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
        if not (number and check(value)):
            self.fail(key, value, allowed)
        return float(value)

    def integer(self, key: str, default: int, minimum: int, allowed: str, maximum: int | None = None) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(key, value, allowed)
        if maximum is not None and value > maximum:
            self.fail(key, value, allowed)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, value, "true or false")
        return value

    def spec(self, key: str, default: str) -> str:
        value = self.string(key, default)
        _check_spec(value, self, key)
        return value


SECTIONS: dict[str, tuple[str, ...]] = {
    "device": ("kind", "memory_gib", "link_gbps", "memory_gbps", "compute_capability"),
    "cache": ("experts_per_layer", "policy"),
    "prefetch": ("enabled", "experts"),
    "quant": (*QUANT_ROLES, "experts_overrides"),
    "generation": ("max_new_tokens", "temperature", "top_p", "top_k", "context"),
    "host": (
        "cores",
        "memory_gbps",
        "compute",
        "expert_ms",
        "device_expert_ms",
        "memory_gib",
        "disk_gbps",
        "policy",
    ),
}


def _check_spec(text: str, table: ProfileTable, key: str) -> None:
    try:
        QuantSpec.parse(text, where=f"{table.source}: {table.prefix}{key}")
    except QuantError as err:
        raise ProfileError(str(err)) from None


def read_device(table: ProfileTable) -> DeviceSettings:
    kind = table.string("kind", None, DEVICE_KINDS)
    positive = "a positive number of"
    memory = table.number("memory_gib", None, lambda v: v > 0, f"{positive} GiB (omit it to use free memory)")
    link = table.number("link_gbps", _DEFAULT_LINK_GBPS[kind], lambda v: v > 0, f"{positive} GB/s")
    bandwidth = table.number("memory_gbps", None, lambda v: v > 0, f"{positive} GB/s")
    capability = table.number(
        "compute_capability", None, lambda v: 1 <= v < 100, "a CUDA compute capability, e.g. 8.6"
    )
    return DeviceSettings(
        kind=kind, memory_gib=memory, link_gbps=link, memory_gbps=bandwidth, compute_capability=capability
    )


def read_cache(table: ProfileTable) -> CacheSettings:
    policy = table.string("policy", DEFAULT_CACHE_POLICY, CACHE_POLICIES)
    value = table.raw.get("experts_per_layer", "auto")
    if isinstance(value, list) and value and all(_positive_int(v) for v in value):
        return CacheSettings(tuple(value), policy)
    if not (value in K_WORDS or _positive_int(value)):
        table.fail("experts_per_layer", value, K_ALLOWED)
    return CacheSettings(value, policy)


def read_prefetch(table: ProfileTable) -> PrefetchSettings:
    enabled = table.boolean("enabled", True)
    return PrefetchSettings(enabled, table.integer("experts", 2, 0, "a non-negative integer"))


def read_quant(table: ProfileTable) -> QuantSettings:
    specs = {role: table.spec(role, default) for role, default in _DEFAULT_QUANT.items()}
    specs["lm_head"] = table.spec("lm_head", specs["embed"])
    raw = table.raw.get("experts_overrides", {})
    if not isinstance(raw, dict):
        table.fail("experts_overrides", raw, 'a table of layer index to spec, e.g. { "0" = "hqq:3:64" }')
    overrides = []
    for layer, spec in raw.items():
        # ASCII digits only: "²".isdigit() is True, yet int("²") fails.
        if not (isinstance(layer, str) and re.fullmatch(r"-?[0-9]{1,9}", layer)):
            table.fail(
                f'experts_overrides."{layer}"',
                spec,
                "keys that are layer indices: 0, 1, …, or -1 for the last",
            )
        if not isinstance(spec, str):
            table.fail(f'experts_overrides."{layer}"', spec, "a quant spec string")
        _check_spec(spec, table, f'experts_overrides."{layer}"')
        overrides.append((int(layer), spec))
    return QuantSettings(experts_overrides=tuple(sorted(overrides)), **specs)


def read_generation(table: ProfileTable) -> GenerationSettings:
    context = table.raw.get("context")
    if context is not None and not _positive_int(context):
        table.fail("context", context, "a positive number of tokens")
    return GenerationSettings(
        max_new_tokens=table.integer("max_new_tokens", 512, 1, "a positive integer"),
        # The flags' ranges (offload.settings.limits): a value out of them would fail only at generation,
        # naming a flag the user never gave.
        temperature=table.number("temperature", 0.7, temperature_allowed, TEMPERATURES),
        top_p=table.number("top_p", 0.9, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        top_k=table.integer("top_k", 0, 0, f"a whole number from 0 (off) to {MAX_TOP_K}", MAX_TOP_K),
        context=context,
    )


def read_host(table: ProfileTable) -> HostSettings:
    positive = "a positive number of"
    cores = table.raw.get("cores", 4)
    if cores != "auto" and not _positive_int(cores):
        table.fail("cores", cores, 'a positive number of cores, or "auto" (the cores a run here would use)')
    return HostSettings(
        cores=cores,
        memory_gbps=table.number("memory_gbps", 50.0, lambda v: v > 0, f"{positive} GB/s"),
        compute=table.string("compute", "auto", HOST_COMPUTE_MODES),
        expert_ms=table.number("expert_ms", None, lambda v: v > 0, f"{positive} milliseconds"),
        device_expert_ms=table.number("device_expert_ms", None, lambda v: v > 0, f"{positive} milliseconds"),
        memory_gib=table.number("memory_gib", None, lambda v: v > 0, f"{positive} GiB"),
        disk_gbps=table.number("disk_gbps", 3.0, lambda v: v > 0, f"{positive} GB/s"),
        policy=table.string("policy", DEFAULT_HOST_POLICY, HOST_TIER_POLICIES),
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def show_value(value: Any) -> str:
    try:
        text = toml_value(value) if isinstance(value, (str, int, float, list, tuple, dict)) else repr(value)
    except (RecursionError, ValueError):  # deeply nested, or an int too long for str()
        text = reprlib.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)
