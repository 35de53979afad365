"""Measuring benchmark rows: greedy runs of each row's ExpertSource, their timings, counters and memory.

Every row gets one warm-up run, then ``runs`` measured ones, all with the same prompt and length. The
measured runs are interleaved (run 1 of every row, then run 2 of every row, ...), so a change in the
machine's load while the bench runs slows every row alike instead of one row. Each row keeps its own
cache, warm between runs (a chat's next turn finds it so); only the counters are zeroed. Counters are
split at the first token: the prefill's, and the decode's (every later token).

Rows that read experts through a host tier (``--host-memory``) share that one tier, whose budget holds one
row's experts, not each row's. Interleaved, each row would start where the row before it left the tier, so
a row's figures would depend on the order of the rows. Such rows run one after another instead, as
llama-bench runs its tests: each from an empty tier, then its own warm-up, then its runs, so its tier is warm
between its runs as its cache is, and two identical rows report the same figures.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import torch

from offload.config import ModelConfig
from offload.errors import OffloadError
from offload.experts.source import ExpertSource
from offload.experts.stats import LayerStats
from offload.experts.tier_stats import TierLayerStats
from offload.generate import SamplingParams, Timings, stream_generate
from offload.loading import attach_source
from offload.model import MixtralModel

Counters = TypeVar("Counters", LayerStats, TierLayerStats)


@dataclass(frozen=True)
class Memory:
    """Bytes per tier for one row, computed from tensor sizes (batch 1, context = prompt + new tokens)."""

    device_dense_bytes: int  # attention, norms, gates, embeddings, lm_head
    device_expert_bytes: int  # every expert (resident), or the slots plus what is built from them
    device_kv_bytes: int  # the KV cache
    host_store_bytes: int  # the host tier: every expert packed once (0 when all are resident)

    @property
    def device_total_bytes(self) -> int:
        return self.device_dense_bytes + self.device_expert_bytes + self.device_kv_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": {
                "dense_bytes": self.device_dense_bytes,
                "expert_bytes": self.device_expert_bytes,
                "kv_bytes": self.device_kv_bytes,
                "total_bytes": self.device_total_bytes,
            },
            "host": {"store_bytes": self.host_store_bytes},
        }


@dataclass
class RowResult:
    """What one row measured: per-run timings, the tokens, and counters summed over the measured runs."""

    name: str
    description: str
    experts_per_layer: int | list[int] | None  # None: every expert resident
    prefetch: int
    timings: list[Timings] = field(default_factory=list)  # one per measured run
    tokens: list[int] = field(default_factory=list)  # the generated ids (the same in every run)
    prefill: LayerStats = field(default_factory=LayerStats)
    decode: LayerStats = field(default_factory=LayerStats)
    memory: Memory | None = None
    tier_prefill: TierLayerStats | None = None  # the host tier's counters, when experts are read from disk
    tier_decode: TierLayerStats | None = None

    def median(self, figure: str) -> float:
        """The median over runs of a Timings property, e.g. ``decode_tokens_per_second``."""
        return statistics.median(getattr(t, figure) for t in self.timings)

    @property
    def decoded_tokens(self) -> int:
        """Tokens that came out of decode steps, over all measured runs (the first of each is the prefill's)."""
        return sum(t.generated_tokens - 1 for t in self.timings)


@dataclass
class RunFigures:
    tokens: list[int]
    timings: Timings
    prefill: LayerStats
    decode: LayerStats
    tier_prefill: TierLayerStats | None = None
    tier_decode: TierLayerStats | None = None


def run_once(model: MixtralModel, prompt_ids: list[int], new_tokens: int) -> RunFigures:
    """One greedy generation of exactly ``new_tokens`` (EOS does not stop it), with its counters."""
    stats = model.expert_source.stats
    if stats is not None:
        stats.reset()
    tier = getattr(model.expert_source, "host_tier", None)
    if tier is not None:
        tier.reset_stats()
    tier_at_first_token = None
    tokens: list[int] = []
    at_first_token = LayerStats()
    response = None
    for response in stream_generate(
        model, prompt_ids, max_new_tokens=new_tokens, sampling=SamplingParams(temperature=0), stop_ids=()
    ):
        tokens.append(response.token)
        if len(tokens) == 1 and stats is not None:
            at_first_token = stats.total()
        if len(tokens) == 1 and tier is not None:
            tier_at_first_token = tier.stats.total()
    assert response is not None, "new_tokens >= 1 yields a response"
    at_end = stats.total() if stats is not None else LayerStats()
    figures = RunFigures(tokens, response.timings, at_first_token, minus(at_end, at_first_token))
    if tier is not None and tier_at_first_token is not None:
        figures.tier_prefill = tier_at_first_token
        figures.tier_decode = minus(tier.stats.total(), tier_at_first_token)
    return figures


def measure_rows(
    rows: list[tuple[RowResult, ExpertSource]],
    model: MixtralModel,
    prompt_ids: list[int],
    new_tokens: int,
    runs: int,
) -> list[RowResult]:
    """Fill each (result, source) pair: a warm-up run each, then ``runs`` measured runs, interleaved unless
    the rows read through a host tier (then row by row, each from an empty tier; see the module's doc)."""
    tiers = [getattr(source, "host_tier", None) for _, source in rows]
    if any(tier is not None for tier in tiers):
        for (result, source), tier in zip(rows, tiers, strict=True):
            if tier is not None:
                tier.empty()
            _warm_up(result, source, model, prompt_ids, new_tokens)
            for _ in range(runs):
                _measure_run(result, source, model, prompt_ids, new_tokens)
    else:
        for result, source in rows:
            _warm_up(result, source, model, prompt_ids, new_tokens)
        for _ in range(runs):
            for result, source in rows:
                _measure_run(result, source, model, prompt_ids, new_tokens)
    for result, source in rows:
        result.memory = memory_of(model, source, len(prompt_ids) + new_tokens)
    return [result for result, _ in rows]


def _warm_up(
    result: RowResult, source: ExpertSource, model: MixtralModel, prompt_ids: list[int], new_tokens: int
) -> None:
    attach_source(model, source)
    result.tokens = run_once(model, prompt_ids, new_tokens).tokens


def _measure_run(
    result: RowResult, source: ExpertSource, model: MixtralModel, prompt_ids: list[int], new_tokens: int
) -> None:
    attach_source(model, source)
    figures = run_once(model, prompt_ids, new_tokens)
    if figures.tokens != result.tokens:
        raise OffloadError(f"bench row {result.name!r}: two runs of the same greedy prompt differ")
    result.timings.append(figures.timings)
    result.prefill += figures.prefill
    result.decode += figures.decode
    if figures.tier_prefill is not None and figures.tier_decode is not None:
        result.tier_prefill = (result.tier_prefill or TierLayerStats()) + figures.tier_prefill
        result.tier_decode = (result.tier_decode or TierLayerStats()) + figures.tier_decode


def minus(after: Counters, before: Counters) -> Counters:
    """The counters gained between two snapshots (the device cache's, or the host tier's)."""
    return type(after)(**{f.name: getattr(after, f.name) - getattr(before, f.name) for f in fields(after)})


def memory_of(model: MixtralModel, source: ExpertSource, context: int) -> Memory:
    """Per-tier bytes of ``model`` served by ``source`` with a KV cache for ``context`` positions."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    dense = sum(t.numel() * t.element_size() for t in tensors)
    experts = source.memory()
    return Memory(
        dense, experts.device_bytes, kv_bytes(model.config, context, model.dtype), experts.host_bytes
    )


def kv_bytes(config: ModelConfig, context: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for ``context`` positions, batch 1."""
    per_position = config.num_key_value_heads * config.head_dim * torch.finfo(dtype).bits // 8
    return 2 * config.num_hidden_layers * context * per_position
