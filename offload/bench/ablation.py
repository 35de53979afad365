"""The expert sources that `offload bench --ablate` compares, all built over one loaded model's host store.

| variant | what it is | the paper's row (arXiv 2312.17238, Table 2) |
|---|---|---|
| ``resident`` | every expert on the device (``ResidentExperts``): no link at all | — (the reference) |
| ``full`` | K slots per layer under the cache policy (LRFU by default, LRU as in the paper), plus prefetching the next layer's guesses | full (LRU + prefetch) |
| ``no-prefetch`` | the same cache, no guesses | without prefetch |
| ``no-cache`` | K slots emptied at every forward pass, no guesses: a token reuses nothing a previous token loaded; within a layer its experts' copies are all in flight at once and the first one computes while the others arrive | without LRU and prefetch |
| ``naive`` | one slot per layer, emptied at every forward pass, no guesses: each routed expert is copied when the block reaches it and the block waits before computing it, so no copy overlaps any compute | naive offloading (accelerate) |

``naive`` moves each expert in one copy of its packed buffer; accelerate moves each weight tensor on
its own and from pageable memory, so on a real GPU it is slower than this row, never faster.
Every variant computes the same experts in the same order of slots, so all give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from offload.experts.cache import ExpertCache
from offload.experts.link import Link
from offload.experts.offloaded import OffloadedExperts
from offload.experts.policy import DEFAULT_CACHE_POLICY
from offload.experts.source import Expert, ExpertSource, Inputs, ResidentExperts
from offload.experts.store import HostStore
from offload.model import MixtralModel
from offload.quant.codec import codec_for

VARIANTS = ("resident", "full", "no-prefetch", "no-cache", "naive")
DESCRIPTIONS = {
    "resident": "every expert on the device",
    "full": "{policy} cache + prefetch",
    "no-prefetch": "{policy} cache, no prefetch",
    "no-cache": "slots emptied every token, no prefetch",
    "naive": "1 slot, load at use and wait (accelerate-like)",
}


class ColdOffloadedExperts(OffloadedExperts):
    """OffloadedExperts that empty every layer's slots at the start of each forward pass."""

    def experts_for(
        self, layer: int, needed: list[int], guesses: list[int], inputs: Inputs | None = None
    ) -> Iterator[tuple[int, Expert]]:
        if layer == 0:
            self.flush()
        return super().experts_for(layer, needed, guesses, inputs)


def materializers(model: MixtralModel) -> list[Callable[[dict[str, Tensor]], Expert]]:
    """One ``materialize`` per layer: the loaded model's expert codec, dtype and device."""
    scheme, dtype, device = model.quant_scheme, model.dtype, model.device
    codecs = [codec_for(scheme.expert_spec(layer)) for layer in range(model.config.num_hidden_layers)]
    return [_materializer(codec, dtype, device) for codec in codecs]


def _materializer(codec: object, dtype: torch.dtype, device: torch.device) -> Callable:
    return lambda tensors: codec.materialize(tensors, dtype, device)


def build_source(
    variant: str,
    model: MixtralModel,
    store: HostStore,
    link: Link,
    experts_per_layer: int,
    prefetch: int,
    policy: str = DEFAULT_CACHE_POLICY,
) -> ExpertSource:
    """The ExpertSource of ``variant`` (see VARIANTS) for ``model``, serving ``store``'s experts.

    ``experts_per_layer``, ``prefetch`` and the cache ``policy`` are the ``full`` row's; the other rows
    drop what they ablate (no-cache and naive empty their slots, so no policy applies).
    Attach the result with ``offload.loading.attach_source``.
    """
    materialize = materializers(model)
    device = model.device
    gates = [layer.block_sparse_moe.gate for layer in model.model.layers]
    if variant == "resident":
        experts = [
            [
                materialize[layer]({n: t.to(device) for n, t in store.tensors(layer, e).items()})
                for e in range(store.num_experts)
            ]
            for layer in range(store.num_layers)
        ]
        return ResidentExperts(experts)
    if variant in ("full", "no-prefetch"):
        cache = ExpertCache(store, experts_per_layer, link, materialize, device=device, policy=policy)
        return OffloadedExperts(cache, gates, prefetch=prefetch if variant == "full" else 0)
    if variant in ("no-cache", "naive"):
        slots = experts_per_layer if variant == "no-cache" else 1
        cache = ExpertCache(store, slots, link, materialize, device=device)
        return ColdOffloadedExperts(cache, gates, prefetch=0)
    raise ValueError(f"unknown ablation variant {variant!r}; expected one of {', '.join(VARIANTS)}")
