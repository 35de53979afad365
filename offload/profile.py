"""Profiles: one TOML file per device class, validated into frozen dataclasses.

Lookup order for ``load_profile(name)``: a path (the name contains "/" or ends in .toml), then
``$OFFLOAD_HOME/profiles/NAME.toml`` (OFFLOAD_HOME defaults to ~/.offload), then the bundled
``profiles/`` directory. Every error is one line naming the file, the dotted key, the value and
what is allowed. Checks that need the model (list lengths, K ≤ E, layer indices) happen in
``Profile.for_model``.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offload.errors import ProfileError, QuantError

if TYPE_CHECKING:
    from offload.config import ModelConfig

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "profiles"
DEVICE_KINDS = ("cuda", "cpu")
# "all" keeps every expert on the device: the CPU profile's K, whatever E the model has.
K_WORDS = ("auto", "all")
K_ALLOWED = "a positive integer, 'auto', 'all', or a list with one positive integer per layer"
MAX_PROFILE_BYTES = 2**20  # a profile is a few hundred bytes; this refuses a wrong or hostile file
QUANT_ROLES = ("attention", "experts", "gate", "embed", "lm_head")
# 3-bit g64 experts: 3.7 stored bits/weight with fp16 scale and zero, less than 2-bit g16 (4.0), and a lower error.
_DEFAULT_QUANT = {"attention": "hqq:4:64", "experts": "hqq:3:64", "gate": "none", "embed": "none"}
_DEFAULT_LINK_GBPS = {"cuda": 12.0, "cpu": 20.0}


@dataclass(frozen=True)
class DeviceSettings:
    kind: str  # "cuda" or "cpu": where attention, the KV cache and the expert slots live
    memory_gib: float | None  # budget for dense weights + expert slots + KV + workspace; None = free memory
    link_gbps: float  # host→device bandwidth in GB/s (1e9 bytes/s), for the plan and EmulatedLink


@dataclass(frozen=True)
class CacheSettings:
    experts_per_layer: int | str | tuple[int, ...]  # K: an int, "auto", "all", or one int per layer


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


@dataclass(frozen=True)
class ResolvedProfile:
    """A profile checked against one model: per-layer K and expert specs."""

    profile: Profile
    num_layers: int  # L of the model it was resolved for
    experts_per_layer: tuple[int, ...] | None  # None when K is "auto": it needs the free memory
    expert_specs: tuple[str, ...]  # one spec per layer

    @property
    def is_auto(self) -> bool:
        return self.experts_per_layer is None


@dataclass(frozen=True)
class Profile:
    name: str  # what `--profile` and `offload profiles list` call it
    description: str  # one line for humans
    source: Path  # the file it was read from; every error names it
    device: DeviceSettings
    cache: CacheSettings
    prefetch: PrefetchSettings
    quant: QuantSettings
    generation: GenerationSettings

    @classmethod
    def from_file(cls, path: str | Path) -> Profile:
        """Read and validate one profile file."""
        path = Path(path)
        try:
            if path.exists() and not path.is_file():
                # A directory, or a device such as /dev/zero that would be read forever.
                raise ProfileError(f"{path}: not a regular file; a profile is a TOML file")
            if path.stat().st_size > MAX_PROFILE_BYTES:
                raise ProfileError(f"{path}: too large for a profile (at most {MAX_PROFILE_BYTES} bytes)")
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ProfileError(f"profile file {path} does not exist") from None
        except (OSError, ValueError) as err:  # ValueError: not UTF-8, or a NUL byte in the path
            raise ProfileError(f"{path}: cannot read profile ({_first_line(err)})") from None
        try:
            raw = tomllib.loads(text)
        except ValueError as err:  # TOMLDecodeError, or an integer of thousands of digits
            # tomllib's message ends "(at line N, column M)".
            raise ProfileError(f"{path}: not valid TOML: {_first_line(err)}") from None
        except RecursionError:
            raise ProfileError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str | Path = "<profile>") -> Profile:
        """Validate a parsed profile table; errors name ``source`` and the dotted key."""
        source = Path(source)
        top = _Table(raw, source, "", ("name", "description", *_SECTIONS))
        device = _device(top.table("device"))
        quant = _quant(top.table("quant"))
        return cls(
            name=top.string("name", source.stem),
            description=top.string("description", ""),
            source=source,
            device=device,
            cache=_cache(top.table("cache")),
            prefetch=_prefetch(top.table("prefetch")),
            quant=quant,
            generation=_generation(top.table("generation")),
        )

    def for_model(self, config: ModelConfig, *, strict_context: bool = True) -> ResolvedProfile:
        """Check the profile against a model: one K per layer, K ≤ E, override layers in range.

        ``strict_context=False`` lets a bundled profile's context (sized for Mixtral-8x7B) exceed a
        smaller model's window; generation never runs past the model's window anyway.
        """
        layers, experts = config.num_hidden_layers, config.num_local_experts
        k = self.cache.experts_per_layer
        if isinstance(k, tuple) and len(k) != layers:
            self._fail(
                "cache.experts_per_layer",
                k,
                f"has {len(k)} entries but the model has {layers} layers; give one per layer",
            )
        per_layer = None if k == "auto" else (experts,) * layers if k == "all" else k
        per_layer = (per_layer,) * layers if isinstance(per_layer, int) else per_layer
        if per_layer and max(per_layer) > experts:
            self._fail(
                "cache.experts_per_layer", k, f"allowed is at most {experts} (the model's experts per layer)"
            )
        if self.prefetch.experts > experts:
            self._fail(
                "prefetch.experts",
                self.prefetch.experts,
                f"allowed is at most {experts} (the model's experts per layer)",
            )
        specs, seen = [self.quant.experts] * layers, set()
        for layer, spec in self.quant.experts_overrides:
            key = f'quant.experts_overrides."{layer}"'
            if not -layers <= layer < layers:
                self._fail(key, spec, f"allowed are layers 0..{layers - 1}, or -{layers}..-1 from the end")
            if layer % layers in seen:
                self._fail(
                    key, spec, f"layer {layer % layers} already has an override (-1 is the last layer)"
                )
            seen.add(layer % layers)
            specs[layer] = spec  # a negative index counts from the last layer, as in Python
        context, limit = self.generation.context, config.max_position_embeddings
        if strict_context and context is not None and context > limit:
            self._fail("generation.context", context, f"allowed is at most the model's {limit} tokens")
        return ResolvedProfile(self, layers, per_layer, tuple(specs))

    def as_dict(self) -> dict[str, Any]:
        """The profile as the nested tables of its TOML file (None values left out)."""
        k = self.cache.experts_per_layer
        quant: dict[str, Any] = {role: getattr(self.quant, role) for role in QUANT_ROLES}
        quant["experts_overrides"] = {str(layer): spec for layer, spec in self.quant.experts_overrides}
        out = {
            "name": self.name,
            "description": self.description,
            "device": vars(self.device),
            "cache": {"experts_per_layer": list(k) if isinstance(k, tuple) else k},
            "prefetch": vars(self.prefetch),
            "quant": quant,
            "generation": vars(self.generation),
        }
        return {
            k: {n: v for n, v in t.items() if v is not None} if isinstance(t, dict) else t
            for k, t in out.items()
        }

    def to_toml(self) -> str:
        """The resolved profile as TOML that ``from_dict`` reads back to an equal profile."""
        lines: list[str] = []
        for key, value in self.as_dict().items():
            if not isinstance(value, dict):
                lines.append(f"{key} = {_toml_value(value)}")
        for key, value in self.as_dict().items():
            if isinstance(value, dict):
                lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in value.items()]
        return "\n".join(lines) + "\n"

    def _fail(self, key: str, value: Any, allowed: str) -> None:
        raise ProfileError(f"{self.source}: {key} = {_show(value)}: {allowed}")


@dataclass(frozen=True)
class ProfileEntry:
    """One row of ``list_profiles``: a profile, or why its file would not load."""

    name: str
    source: Path
    profile: Profile | None
    error: str | None


def offload_home() -> Path:
    """The user directory: $OFFLOAD_HOME, or ~/.offload."""
    return Path(os.environ.get("OFFLOAD_HOME") or Path.home() / ".offload").expanduser()


def default_profile_name(cuda_available: bool | None = None) -> str:
    """``auto`` with a CUDA device, ``cpu`` without one."""
    if cuda_available is None:
        import torch  # lazily: `offload --help` must not import torch

        cuda_available = torch.cuda.is_available()
    return "auto" if cuda_available else "cpu"


def load_profile(name_or_path: str | None = None, *, cuda_available: bool | None = None) -> Profile:
    """Find and validate a profile by path or name (see the module docstring for the order)."""
    name = name_or_path or default_profile_name(cuda_available)
    if "/" in name or os.sep in name or name.endswith(".toml"):
        return Profile.from_file(Path(name).expanduser())
    candidates = [offload_home() / "profiles" / f"{name}.toml", BUNDLED_DIR / f"{name}.toml"]
    for path in candidates:
        if path.is_file():
            return Profile.from_file(path)
    known = ", ".join(sorted(_profile_paths())) or "none"
    looked = ", ".join(str(path) for path in candidates)
    raise ProfileError(f"profile {name!r} not found; looked in {looked} (available: {known})")


def list_profiles() -> list[ProfileEntry]:
    """Every profile by name, a user file shadowing a bundled one; broken files carry their error."""
    entries = []
    for name, path in sorted(_profile_paths().items()):
        try:
            entries.append(ProfileEntry(name, path, Profile.from_file(path), None))
        except ProfileError as err:
            entries.append(ProfileEntry(name, path, None, str(err)))
    return entries


def _profile_paths() -> dict[str, Path]:
    paths = {path.stem: path for path in BUNDLED_DIR.glob("*.toml")}
    return paths | {path.stem: path for path in (offload_home() / "profiles").glob("*.toml")}


class _Table:
    """One TOML table of a profile; every error names the file and the dotted key."""

    def __init__(self, raw: Any, source: Path, prefix: str, allowed: tuple[str, ...]) -> None:
        self.source, self.prefix = source, prefix
        if not isinstance(raw, dict):
            self.fail("", raw, f"a table [{prefix.rstrip('.')}]")
        for key in raw:
            if key not in allowed:
                where = f"in [{prefix.rstrip('.')}]" if prefix else "at the top level"
                raise ProfileError(
                    f"{source}: unknown key {prefix}{key} = {_show(raw[key])}; "
                    f"allowed keys {where}: {', '.join(allowed)}"
                )
        self.raw: dict[str, Any] = raw

    def fail(self, key: str, value: Any, allowed: str) -> None:
        name = f"{self.prefix}{key}".rstrip(".")
        shown = "is missing" if value is None else f"= {_show(value)}"
        raise ProfileError(f"{self.source}: {name} {shown}: allowed is {allowed}")

    def table(self, key: str) -> _Table:
        return _Table(self.raw.get(key, {}), self.source, f"{self.prefix}{key}.", _SECTIONS[key])

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

    def integer(self, key: str, default: int, minimum: int, allowed: str) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
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


_SECTIONS: dict[str, tuple[str, ...]] = {
    "device": ("kind", "memory_gib", "link_gbps"),
    "cache": ("experts_per_layer",),
    "prefetch": ("enabled", "experts"),
    "quant": (*QUANT_ROLES, "experts_overrides"),
    "generation": ("max_new_tokens", "temperature", "top_p", "top_k", "context"),
}


def _check_spec(text: str, table: _Table, key: str) -> None:
    from offload.quant.spec import QuantSpec

    try:
        QuantSpec.parse(text, where=f"{table.source}: {table.prefix}{key}")
    except QuantError as err:
        raise ProfileError(str(err)) from None


def _device(table: _Table) -> DeviceSettings:
    kind = table.string("kind", None, DEVICE_KINDS)
    positive = "a positive number of"
    memory = table.number("memory_gib", None, lambda v: v > 0, f"{positive} GiB (omit it to use free memory)")
    link = table.number("link_gbps", _DEFAULT_LINK_GBPS[kind], lambda v: v > 0, f"{positive} GB/s")
    return DeviceSettings(kind=kind, memory_gib=memory, link_gbps=link)


def _cache(table: _Table) -> CacheSettings:
    value = table.raw.get("experts_per_layer", "auto")
    if isinstance(value, list) and value and all(_positive_int(v) for v in value):
        return CacheSettings(tuple(value))
    if not (value in K_WORDS or _positive_int(value)):
        table.fail("experts_per_layer", value, K_ALLOWED)
    return CacheSettings(value)


def _prefetch(table: _Table) -> PrefetchSettings:
    enabled = table.boolean("enabled", True)
    return PrefetchSettings(enabled, table.integer("experts", 2, 0, "a non-negative integer"))


def _quant(table: _Table) -> QuantSettings:
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


def _generation(table: _Table) -> GenerationSettings:
    context = table.raw.get("context")
    if context is not None and not _positive_int(context):
        table.fail("context", context, "a positive number of tokens")
    return GenerationSettings(
        max_new_tokens=table.integer("max_new_tokens", 512, 1, "a positive integer"),
        temperature=table.number("temperature", 0.7, lambda v: v >= 0, "a number ≥ 0 (0 = greedy)"),
        top_p=table.number("top_p", 0.9, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        top_k=table.integer("top_k", 0, 0, "a non-negative integer (0 = off)"),
        context=context,
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _show(value: Any) -> str:
    try:
        text = _toml_value(value) if isinstance(value, (str, int, float, list, tuple, dict)) else repr(value)
    except (RecursionError, ValueError):  # deeply nested, or an int too long for str()
        text = reprlib.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)
