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
