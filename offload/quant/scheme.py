"""QuantScheme: which spec each role (and each layer's experts) is stored in.

It comes from a profile, from command-line specs, or from the ``quantization`` block that
``offload convert`` writes into config.json; ``as_block`` writes that block back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from offload.errors import QuantError
from offload.quant.spec import ROLES, QuantSpec

BLOCK_FORMAT = "offload-quant/1"
NONE = QuantSpec.parse("none")


@dataclass(frozen=True)
class QuantScheme:
    attention: QuantSpec = NONE  # q, k, v and o projections
    experts: tuple[QuantSpec, ...] = ()  # one per layer; empty means none everywhere
    gate: QuantSpec = NONE  # the router of each MoE block
    embed: QuantSpec = NONE  # the token embedding (only none is supported)
    lm_head: QuantSpec = NONE  # the output projection

    def expert_spec(self, layer: int) -> QuantSpec:
        """The spec of ``layer``'s experts."""
        return self.experts[layer] if self.experts else NONE

    @property
    def is_float(self) -> bool:
        """True when nothing is quantized."""
        specs = [self.attention, self.gate, self.embed, self.lm_head, *self.experts]
        return all(spec.backend == "none" for spec in specs)

    @classmethod
    def build(
        cls,
        num_layers: int,
        *,
        attention: str = "none",
        experts: str = "none",
        expert_overrides: dict[int, str] | None = None,
        gate: str = "none",
        embed: str = "none",
        lm_head: str = "none",
        where: str = "quant",
    ) -> QuantScheme:
        """Parse specs; ``expert_overrides`` maps a layer (negative counts from the end) to its spec."""
        per_layer = [QuantSpec.parse(experts, where=f"{where}.experts")] * num_layers
        for layer, text in (expert_overrides or {}).items():
            if not -num_layers <= layer < num_layers:
                raise QuantError(
                    f"{where}.experts layer {layer} is out of range; allowed are 0..{num_layers - 1}"
                )
            per_layer[layer] = QuantSpec.parse(text, where=f"{where}.experts layer {layer}")
        scheme = cls(
            attention=QuantSpec.parse(attention, where=f"{where}.attention"),
            experts=tuple(per_layer),
            gate=QuantSpec.parse(gate, where=f"{where}.gate"),
            embed=QuantSpec.parse(embed, where=f"{where}.embed"),
            lm_head=QuantSpec.parse(lm_head, where=f"{where}.lm_head"),
        )
        if scheme.embed.backend != "none":
            raise QuantError(f"{where}.embed: only 'none' is supported for the embedding, got {scheme.embed}")
        return scheme

    @classmethod
    def from_profile(cls, resolved: Any) -> QuantScheme:
        """From a ``ResolvedProfile`` (per-layer expert specs already resolved)."""
        quant = resolved.profile.quant
        scheme = cls.build(
            resolved.num_layers,
            attention=quant.attention,
            gate=quant.gate,
            embed=quant.embed,
            lm_head=quant.lm_head,
            where=f"{resolved.profile.source}: quant",
        )
        experts = tuple(QuantSpec.parse(text, where="quant.experts") for text in resolved.expert_specs)
        return cls(scheme.attention, experts, scheme.gate, scheme.embed, scheme.lm_head)

    @classmethod
    def from_block(cls, block: Any, num_layers: int, source: str = "config.json") -> QuantScheme:
        """Read the ``quantization`` block of a converted checkpoint's config.json."""
        where = f"{source}: quantization"
        if not isinstance(block, dict) or block.get("format") != BLOCK_FORMAT:
            raise QuantError(f'{where} must be an object with "format": "{BLOCK_FORMAT}"')
        experts = block.get("experts")
        if not isinstance(experts, list) or len(experts) != num_layers:
            raise QuantError(f"{where}.experts must list one spec per layer ({num_layers})")
        for role in ("attention", "gate", "embed", "lm_head"):
            if not isinstance(block.get(role), str):
                raise QuantError(f"{where}.{role} must be a spec string such as 'hqq:4:64' or 'none'")
        if not all(isinstance(text, str) for text in experts):
            raise QuantError(f"{where}.experts must be spec strings")
        return cls.build(
            num_layers,
            attention=block["attention"],
            gate=block["gate"],
            embed=block["embed"],
            lm_head=block["lm_head"],
            expert_overrides=dict(enumerate(experts)),
            where=where,
        )

    def as_block(self, num_layers: int) -> dict[str, Any]:
        """The ``quantization`` block that records every role's and layer's spec."""
        return {
            "format": BLOCK_FORMAT,
            **{role: str(getattr(self, role)) for role in ROLES if role != "experts"},
            "experts": [str(self.expert_spec(layer)) for layer in range(num_layers)],
        }
