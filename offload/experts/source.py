"""Where the MoE block gets its experts from, without knowing where they live.

Shapes: T tokens, D hidden, F expert width.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class Expert(Protocol):
    """One SwiGLU expert, ready to run on the compute device."""

    def __call__(self, x: Tensor) -> Tensor:  # (T, D) -> (T, D)
        ...


class DenseExpert:
    """An expert held as three dense matrices in the hub's layout: w1, w3 are (F, D); w2 is (D, F)."""

    def __init__(self, w1: Tensor, w2: Tensor, w3: Tensor) -> None:
        self.w1, self.w2, self.w3 = w1, w2, w3

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(F.silu(F.linear(x, self.w1)) * F.linear(x, self.w3), self.w2)


class ExpertSource(Protocol):
    """Hands the MoE block its experts. Implementations: ResidentExperts, OffloadedExperts."""

    def speculate(self, layer: int, hidden: Tensor) -> Tensor | None:
        """Guess layer+1's experts from layer's normalised input (T, D), on the device, without syncing.

        Returns a 1-D tensor of expert ids, or None when there is nothing to guess.
        """
        ...

    def experts_for(self, layer: int, needed: list[int], guesses: list[int]) -> Iterator[tuple[int, Expert]]:
        """Yield (expert id, expert) for every id in ``needed``, in the order they become usable.

        ``guesses`` are the ids that ``speculate`` returned for layer+1, already on the host.
        The caller finishes with each expert before asking for the next.
        """
        ...


class ResidentExperts:
    """Every expert on the device: the reference that offloading must reproduce bit for bit."""

    def __init__(self, experts: list[list[Expert]]) -> None:
        self.experts = experts  # [layer][expert]

    def speculate(self, layer: int, hidden: Tensor) -> Tensor | None:
        return None

    def experts_for(self, layer: int, needed: list[int], guesses: list[int]) -> Iterator[tuple[int, Expert]]:
        for expert_id in needed:
            yield expert_id, self.experts[layer][expert_id]


def route(router_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Mixtral's router: softmax in fp32 over all experts, top-k, renormalise.

    (T, E) logits -> (T, k) weights in fp32 and (T, k) expert ids.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # upcast inside, as the reference
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids
