"""The bench report: what `offload bench` measured, and its JSON form.

JSON schema (``BenchReport.as_dict``; ``format`` "offload-bench", ``version`` 1). Bytes are bytes,
times seconds, speeds tokens per second; ratios are None where there is nothing to divide.

    format, version            "offload-bench", 1
    model                      the model directory
    device, dtype, quant       where and how it ran (quant: the experts' spec per layer, e.g. "none")
    num_layers                 the model's decoder layers
    prompt                     {tokens, source, ids}
    new_tokens, runs           tokens generated per run, measured runs per row (after one warm-up)
    experts_per_layer          K of the offloaded rows (int, list per layer, or None: resident only)
    prefetch                   guesses per layer of the "full"/"offloaded" row
    cache_policy               the offloaded rows' eviction policy: lrfu | lru (offload.experts.policy)
    link                       {spec, gbps, latency_us, copy_ratio, layer_seconds, expert_bytes, expert_copy_seconds,
                                effective_copy_ratio}: layer_seconds is the calibration's (copy_ratio only);
                               effective_copy_ratio divides the copy time by the resident row's own layer time
                               in the measured runs, which the machine's load can make differ from the calibration
    host                       None, or the cost model's inputs: {host_compute, host_ratio, host (what computes),
                               link_gbps, copy_seconds, host_expert_seconds and device_expert_seconds (by token
                               count), prefill_threshold_tokens (from how many tokens a miss is cheaper copied)}
    rows[]                     one per ExpertSource, in the order measured:
      name                     resident | full | copy-only | no-prefetch | no-cache | naive | host-experts |
                               offloaded
      description              one line
      experts_per_layer, prefetch  this row's own (None: resident)
      prefill_tokens_per_second, ttft_seconds, decode_tokens_per_second   medians over runs
      decode_tokens_per_second_runs  every run's decode speed
      ratio_to_full            decode speed / the full row's (ablation only, else None)
      prefill, decode          counters summed over the runs, each {tokens, accesses, hits, misses,
                               hit_rate, loads, prefetch_loads, prefetch_hits, wasted_prefetches,
                               prefetch_recall, prefetch_precision, bytes_moved, bytes_moved_per_token,
                               loads_per_token, wait_seconds, wait_seconds_per_token, host_computes,
                               host_computes_per_token, host_wait_seconds}
                               ("decode" counts every token after the first, which the prefill makes)
      memory                   {device: {dense_bytes, expert_bytes, kv_bytes, total_bytes}, host: {store_bytes}},
                               from tensor sizes (store_bytes: the host tier's arena when there is one)
      host_tier                None, or (--host-memory) the host tier's counters summed over the runs:
                               {prefill, decode}, each {tokens, accesses, hits, misses, hit_rate, reads,
                               prefetch_reads, disk_bytes_read, disk_bytes_read_per_token, disk_wait_seconds,
                               disk_wait_seconds_per_token}; rows share one tier, so they run one after
                               another, each from an empty tier warmed by its own warm-up run
      tokens                   the generated ids
    host_tier                  None, or {budget_bytes, bytes_held, slots, experts, policy, disk}: the host tier
                               (offload.experts.host_tier) every offloaded row reads experts through
    identical_tokens           true: every row (and the policy check) gave the resident row's tokens
    policy_check               None, or (ablation with one K) offload.bench.policy_check's block: measured and
                               replayed bytes of one recorded cold run of "copy-only", against Belady
    machine                    {python, torch, cpu_count, torch_threads, load_average_start, load_average_end,
                                peak_rss_bytes (the whole process, at the end), cuda_peak_bytes (torch's, or None),
                                cpu_int4_kernel ("vnni" where ours ran, else "torch"), cpu_f32_kernel ("ours"
                                or "torch": the float32 one-token products and attention; OFFLOAD_CPU_KERNEL)}
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from offload.bench.measure import RowResult
from offload.errors import OffloadError
from offload.experts.policy import DEFAULT_CACHE_POLICY
from offload.experts.stats import LayerStats
from offload.experts.tier_stats import TierLayerStats

FORMAT = "offload-bench"
VERSION = 1


class BenchError(OffloadError):
    """A bench setting is out of range, or a row gave other tokens than the resident one."""


@dataclass(frozen=True)
class LinkInfo:
    spec: str  # as given, or "emulated:GBPS:LATENCY" when copy_ratio chose the bandwidth
    gbps: float | None = None  # an emulated link's bandwidth (1e9 bytes/s)
    latency_us: float | None = None
    copy_ratio: float | None = None  # one expert copy / one layer's compute, when asked for
    layer_seconds: float | None = None  # one layer's decode compute, measured by a calibration of resident
    expert_bytes: int | None = None  # the largest packed expert (what one copy moves)

    @property
    def expert_copy_seconds(self) -> float | None:
        if self.gbps is None or self.expert_bytes is None:
            return None
        return (self.latency_us or 0.0) * 1e-6 + self.expert_bytes / (self.gbps * 1e9)


@dataclass
class BenchReport:
    """Everything `offload bench` measured; ``as_dict`` is the JSON (see the module docstring)."""

    model: str
    device: str
    dtype: str
    quant: str
    prompt_ids: list[int]
    prompt_source: str
    new_tokens: int
    runs: int
    experts_per_layer: int | list[int] | None
    prefetch: int
    link: LinkInfo
    cache_policy: str = DEFAULT_CACHE_POLICY
    rows: list[RowResult] = field(default_factory=list)
    num_layers: int | None = None
    policy_check: dict[str, Any] | None = None
    host: dict[str, Any] | None = None
    host_tier: dict[str, Any] | None = None
    machine: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> RowResult | None:
        """The row called ``name``, if it was measured."""
        return next((row for row in self.rows if row.name == name), None)

    def ratio_to_full(self, row: RowResult) -> float | None:
        """``row``'s decode speed over the full row's (ablation only)."""
        full = self.row("full")
        if full is None:
            return None
        return row.median("decode_tokens_per_second") / full.median("decode_tokens_per_second")

    def effective_copy_ratio(self) -> float | None:
        """One expert copy over one layer of the resident row's measured decode, when both are known."""
        resident, copy = self.row("resident"), self.link.expert_copy_seconds
        if resident is None or copy is None or self.num_layers is None:
            return None
        return copy * resident.median("decode_tokens_per_second") * self.num_layers

    def as_dict(self) -> dict[str, Any]:
        link = self.link
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "quant": self.quant,
            "num_layers": self.num_layers,
            "prompt": {"tokens": len(self.prompt_ids), "source": self.prompt_source, "ids": self.prompt_ids},
            "new_tokens": self.new_tokens,
            "runs": self.runs,
            "experts_per_layer": self.experts_per_layer,
            "prefetch": self.prefetch,
            "cache_policy": self.cache_policy,
            "link": {
                "spec": link.spec,
                "gbps": link.gbps,
                "latency_us": link.latency_us,
                "copy_ratio": link.copy_ratio,
                "layer_seconds": link.layer_seconds,
                "expert_bytes": link.expert_bytes,
                "expert_copy_seconds": link.expert_copy_seconds,
                "effective_copy_ratio": self.effective_copy_ratio(),
            },
            "host": self.host,
            "host_tier": self.host_tier,
            "rows": [self._row_dict(row) for row in self.rows],
            "identical_tokens": True,  # run_bench raises BenchError otherwise
            "policy_check": self.policy_check,
            "machine": self.machine,
        }

    def _row_dict(self, row: RowResult) -> dict[str, Any]:
        assert row.memory is not None, "a measured row has its memory figures"
        return {
            "name": row.name,
            "description": row.description,
            "experts_per_layer": row.experts_per_layer,
            "prefetch": row.prefetch,
            "prefill_tokens_per_second": row.median("prefill_tokens_per_second"),
            "ttft_seconds": row.median("ttft_seconds"),
            "decode_tokens_per_second": row.median("decode_tokens_per_second"),
            "decode_tokens_per_second_runs": [t.decode_tokens_per_second for t in row.timings],
            "ratio_to_full": self.ratio_to_full(row),
            "prefill": counters(row.prefill, len(self.prompt_ids) * len(row.timings)),
            "decode": counters(row.decode, row.decoded_tokens),
            "memory": row.memory.as_dict(),
            "host_tier": None
            if row.tier_prefill is None or row.tier_decode is None
            else {
                "prefill": tier_counters(row.tier_prefill, len(self.prompt_ids) * len(row.timings)),
                "decode": tier_counters(row.tier_decode, row.decoded_tokens),
            },
            "tokens": row.tokens,
        }


def _per_token(value: float, tokens: int) -> float | None:
    return value / tokens if tokens else None


def counters(stats: LayerStats, tokens: int) -> dict[str, Any]:
    """One phase's counters with their ratios and per-token figures."""

    per_token = functools.partial(_per_token, tokens=tokens)

    return {
        "tokens": tokens,
        "accesses": stats.accesses,
        "hits": stats.hits,
        "misses": stats.misses,
        "hit_rate": stats.hit_rate,
        "loads": stats.loads,
        "prefetch_loads": stats.prefetch_loads,
        "prefetch_hits": stats.prefetch_hits,
        "wasted_prefetches": stats.wasted_prefetches,
        "prefetch_recall": stats.prefetch_recall,
        "prefetch_precision": stats.prefetch_precision,
        "bytes_moved": stats.bytes_moved,
        "bytes_moved_per_token": per_token(stats.bytes_moved),
        "loads_per_token": per_token(stats.loads),
        "wait_seconds": stats.wait_seconds,
        "wait_seconds_per_token": per_token(stats.wait_seconds),
        "host_computes": stats.host_computes,
        "host_computes_per_token": per_token(stats.host_computes),
        "host_wait_seconds": stats.host_wait_seconds,
    }


def tier_counters(stats: TierLayerStats, tokens: int) -> dict[str, Any]:
    """One phase's host-tier counters with the hit rate and per-token figures."""

    per_token = functools.partial(_per_token, tokens=tokens)

    return {
        "tokens": tokens,
        "accesses": stats.accesses,
        "hits": stats.hits,
        "misses": stats.misses,
        "hit_rate": stats.hit_rate,
        "reads": stats.reads,
        "prefetch_reads": stats.prefetch_reads,
        "disk_bytes_read": stats.disk_bytes_read,
        "disk_bytes_read_per_token": per_token(stats.disk_bytes_read),
        "disk_wait_seconds": stats.disk_wait_seconds,
        "disk_wait_seconds_per_token": per_token(stats.disk_wait_seconds),
    }
