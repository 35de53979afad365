"""The expert sources that `offload bench --ablate` compares, all built over one loaded model's host store.

| variant | what it is | the paper's row (arXiv 2312.17238, Table 2) |
|---|---|---|
| ``resident`` | every expert on the device (``ResidentExperts``): no link at all | — (the reference) |
| ``full`` | what the product does by default: the hybrid engine, K slots per layer under the cache policy, prefetching the next layer's guesses, and each miss copied or computed on the host as the cost model finds cheaper (``offload.experts.cost_model``) | — (beyond the paper) |
| ``copy-only`` | the same cache and prefetch, every miss copied to the device | full (LRU + prefetch) |
| ``no-prefetch`` | the copy-only cache, no guesses | without prefetch |
| ``no-cache`` | K slots emptied at every forward pass, no guesses: a token reuses nothing a previous token loaded; within a layer its experts' copies are all in flight at once and the first one computes while the others arrive | without LRU and prefetch |
| ``naive`` | one slot per layer, emptied at every forward pass, no guesses: each routed expert is copied when the block reaches it and the block waits before computing it, so no copy overlaps any compute | naive offloading (accelerate) |
| ``host-experts`` | every expert computed on the host, attention on the device: llama.cpp's ``--cpu-moe`` layout; nothing but activations crosses the link | — |

``naive`` moves each expert in one copy of its packed buffer; accelerate moves each weight tensor on
its own and from pageable memory, so on a real GPU it is slower than this row, never faster.
Every variant computes the same experts in the same order of slots, so all give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from offload.experts.cache import ExpertCache
from offload.experts.host_only import HostOnlyExperts
from offload.experts.host_tier import HostTier
from offload.experts.link import Link
from offload.experts.offloaded import HostPath, OffloadedExperts
from offload.experts.policy import DEFAULT_CACHE_POLICY
from offload.experts.source import Expert, ExpertSource, Inputs, ResidentExperts
from offload.experts.store import HostStore
from offload.model import MixtralModel
from offload.quant.codec import codec_for

VARIANTS = ("resident", "full", "copy-only", "no-prefetch", "no-cache", "naive", "host-experts")
DESCRIPTIONS = {
    "resident": "every expert on the device",
    "full": "{policy} cache + prefetch, each miss copied or on the host (hybrid)",
    "copy-only": "{policy} cache + prefetch, every miss copied",
    "no-prefetch": "{policy} cache, no prefetch",
    "no-cache": "slots emptied every token, no prefetch",
    "naive": "1 slot, load at use and wait (accelerate-like)",
    "host-experts": "every expert on the host (llama.cpp --cpu-moe)",
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
    store: HostStore | HostTier,
    link: Link,
    experts_per_layer: int,
    prefetch: int,
    policy: str = DEFAULT_CACHE_POLICY,
    host: HostPath | None = None,
) -> ExpertSource:
    """The ExpertSource of ``variant`` (see VARIANTS) for ``model``, serving ``store``'s experts.

    ``experts_per_layer``, ``prefetch`` and the cache ``policy`` are the ``full`` row's; the other rows
    drop what they ablate (no-cache and naive empty their slots, so no policy applies). ``host`` is the
    host path of ``full`` (None: full copies every miss, as copy-only) and the host of ``host-experts``.
    Attach the result with ``offload.loading.attach_source``.
    """
    materialize = materializers(model)
    device = model.device
    gates = [layer.block_sparse_moe.gate for layer in model.model.layers]
    if variant == "resident":
        # A host tier's views are of slots that later reads overwrite: copy them, even to a CPU device.
        copy = not isinstance(store, HostStore)
        experts = [
            [
                materialize[layer]({n: t.to(device, copy=copy) for n, t in store.tensors(layer, e).items()})
                for e in range(store.num_experts)
            ]
            for layer in range(store.num_layers)
        ]
        return ResidentExperts(experts)
    if variant == "host-experts":
        if host is None:
            raise ValueError("the host-experts row needs a host")
        return HostOnlyExperts(store, host.host, host.materialize)
    if variant in ("full", "copy-only", "no-prefetch"):
        cache = ExpertCache(store, experts_per_layer, link, materialize, device=device, policy=policy)
        row_prefetch = 0 if variant == "no-prefetch" else prefetch
        return OffloadedExperts(cache, gates, row_prefetch, host if variant == "full" else None)
    if variant in ("no-cache", "naive"):
        slots = experts_per_layer if variant == "no-cache" else 1
        cache = ExpertCache(store, slots, link, materialize, device=device)
        return ColdOffloadedExperts(cache, gates, prefetch=0)
    raise ValueError(f"unknown ablation variant {variant!r}; expected one of {', '.join(VARIANTS)}")
