"""Profiles: one TOML file per device class, validated into frozen dataclasses.

Lookup order for ``load_profile(name)``: a path (the name contains "/" or ends in .toml), then
``$OFFLOAD_HOME/profiles/NAME.toml`` (OFFLOAD_HOME defaults to ~/.offload), then the bundled
``profiles/`` directory. Every error is one line naming the file, the dotted key, the value and
what is allowed. Checks that need the model (list lengths, K ≤ E, layer indices) happen in
``Profile.for_model``.
"""

from __future__ import annotations

import importlib.resources
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offload.errors import ProfileError, first_line
from offload.settings.profile_toml import (
    QUANT_ROLES,
    SECTIONS,
    CacheSettings,
    DeviceSettings,
    GenerationSettings,
    HostSettings,
    PrefetchSettings,
    ProfileTable,
    QuantSettings,
    read_cache,
    read_device,
    read_generation,
    read_host,
    read_prefetch,
    read_quant,
    show_value,
    toml_value,
)

if TYPE_CHECKING:
    from offload.config import ModelConfig


def _bundled_dir() -> Path:
    """The bundled profiles: package data of an installed wheel, else the source tree's profiles/ folder."""
    try:
        found = importlib.resources.files("offload.profiles")
    except ModuleNotFoundError:  # a source checkout, where the profiles are edited at the top level
        return Path(__file__).resolve().parents[2] / "profiles"
    return Path(str(found))


BUNDLED_DIR = _bundled_dir()
MAX_PROFILE_BYTES = 2**20  # a profile is a few hundred bytes; this refuses a wrong or hostile file


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
    host: HostSettings = field(default_factory=HostSettings)

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
            raise ProfileError(f"{path}: cannot read profile ({first_line(err)})") from None
        try:
            raw = tomllib.loads(text)
        except ValueError as err:  # TOMLDecodeError, or an integer of thousands of digits
            # tomllib's message ends "(at line N, column M)".
            raise ProfileError(f"{path}: not valid TOML: {first_line(err)}") from None
        except RecursionError:
            raise ProfileError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str | Path = "<profile>") -> Profile:
        """Validate a parsed profile table; errors name ``source`` and the dotted key."""
        source = Path(source)
        top = ProfileTable(raw, source, "", ("name", "description", *SECTIONS))
        device = read_device(top.table("device"))
        quant = read_quant(top.table("quant"))
        return cls(
            name=top.string("name", source.stem),
            description=top.string("description", ""),
            source=source,
            device=device,
            cache=read_cache(top.table("cache")),
            prefetch=read_prefetch(top.table("prefetch")),
            quant=quant,
            generation=read_generation(top.table("generation")),
            host=read_host(top.table("host")),
        )

    def for_model(self, config: ModelConfig) -> ResolvedProfile:
        """Check the profile against a model: one K per layer, K ≤ E, override layers in range.

        A ``generation.context`` beyond the model's window is not an error: a bundled profile is sized
        for Mixtral-8x7B, and every user of the context caps it at the model's window.
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
            "cache": {
                "experts_per_layer": list(k) if isinstance(k, tuple) else k,
                "policy": self.cache.policy,
            },
            "prefetch": vars(self.prefetch),
            "quant": quant,
            "generation": vars(self.generation),
            "host": vars(self.host),
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
                lines.append(f"{key} = {toml_value(value)}")
        for key, value in self.as_dict().items():
            if isinstance(value, dict):
                lines += ["", f"[{key}]"] + [f"{k} = {toml_value(v)}" for k, v in value.items()]
        return "\n".join(lines) + "\n"

    def _fail(self, key: str, value: Any, allowed: str) -> None:
        raise ProfileError(f"{self.source}: {key} = {show_value(value)}: {allowed}")


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
