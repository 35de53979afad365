"""Predicted decode speed per policy (copy-only, host-only, hybrid), with the arithmetic shown.

Per token, summed over layers l (E experts, top_k chosen, K_l slots), at batch 1:
    p_l       = min(1, K_l / E);  hit_l = p_l + LOCALITY_BONUS · p_l · (1 - p_l)
    hits_l    = top_k · hit_l;    misses_l = top_k · (1 - hit_l)
    dense_l   = LAYER_OVERHEAD_S + attention weights / WEIGHTS_PER_S           (on the device)
    device_e  = 3·D·F / WEIGHTS_PER_S                                           (one expert on the device)
    host_e    = expert bytes / min(cores · HOST_GBPS_PER_CORE, memory GB/s) + HOST_JOB_S
    copy_e    = expert bytes / link GB/s
    copy-only: t_l = dense_l + top_k · device_e + link_l - min(recall · link_l, compute_l / 2)
               (``offload.settings.plan``'s formula, calibrated on the paper's figures)
    host-only: t_l = dense_l + top_k · (host_e + 2 · D · 2 bytes / link)        (llama.cpp --cpu-moe)
    hybrid:    a miss goes where ``offload.experts.cost_model`` says (host_e against copy_e + device_e);
               on the host: H = misses_l · host_e, D = hits_l · device_e, the host working while the device
               computes the hits; when D > H the cost model moves x = min(hits_l, (D - H) / (device_e + host_e))
               hits to the host as well, and t_l = dense_l + max(D - x · device_e, H + x · host_e);
               a miss on the device: the copy-only t_l
    tok/s      = 1 / (Σ t_l + lm_head weights / WEIGHTS_PER_S)
Assumptions: the host streams an expert's stored bytes once per token (a kernel that reads the packed codes,
memory- or core-bound, whichever binds); hybrid keeps the copy-only hit rate (its idle-link copies keep the
cache warm) and counts no prefetch; host work does not slow the device's launches. A profile's [host]
``expert_ms`` and ``device_expert_ms`` replace host_e and device_e.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from offload.config import ModelConfig
from offload.experts.cost_model import HOST, CostInputs, CostModel, Miss, TokenCurve

LOCALITY_BONUS = 0.3
PREFETCH_RECALL = 0.6  # share of needed experts that top_k guesses catch one layer ahead (assumed)
LAYER_OVERHEAD_S = {"cuda": 2e-3, "cpu": 0.5e-3}  # Python, kernel launches, the one host sync per layer
# Active weights a decode step gets through per second. Quantized kernels cost per weight (dequantize, then
# multiply) whatever the bit width, so this counts weights, not bytes. CPU: 2 cores run dense bf16 at about
# 8e9 and hqq (dequantize on every call) at about 1.3e9 (FACTS.md); cached dequantized experts sit between.
WEIGHTS_PER_S = {"cuda": 50e9, "cpu": 2e9}
# An int4 CPU kernel at batch 1 on one thread read a 14336 x 4096 matrix's codes (29 MB) in 3.8 ms (issue 15).
HOST_GBPS_PER_CORE = 7.7
HOST_JOB_S = 50e-6  # handing one expert to the host thread and back
POLICIES = ("copy-only", "host-only", "hybrid")


@dataclass(frozen=True)
class SpeedPlan:
    """The predicted tok/s of each policy and the figures behind them."""

    tok_s: dict[str, float]  # policy -> predicted decode tok/s
    hit_rate: float  # mean over layers
    device_expert_s: float
    host_expert_s: float
    copy_s: float  # one expert of layer 0 over the link
    miss_on_host: bool  # the cost model's choice for a miss at one token
    arithmetic: tuple[str, ...]  # the sums, one line each

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "arithmetic": list(self.arithmetic)}


def predict_speeds(
    config: ModelConfig, profile: Any, ks: Sequence[int], expert_bytes: Sequence[int]
) -> SpeedPlan:
    """Every policy's predicted decode speed for ``config`` with K_l = ``ks`` under ``profile``."""
    kind, top_k, experts = profile.device.kind, config.num_experts_per_tok, config.num_local_experts
    host, link_bps = profile.host, profile.device.link_gbps * 1e9
    rate, overhead = WEIGHTS_PER_S[kind], LAYER_OVERHEAD_S[kind]
    d, f = config.hidden_size, config.intermediate_size
    q_out, kv_out = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attention = 2 * d * (q_out + kv_out)
    device_e = host.device_expert_ms * 1e-3 if host.device_expert_ms else 3 * d * f / rate
    host_gbps = min(host.cores * HOST_GBPS_PER_CORE, host.memory_gbps)
    host_e = [
        host.expert_ms * 1e-3 if host.expert_ms else b / (host_gbps * 1e9) + HOST_JOB_S for b in expert_bytes
    ]
    crossing = 2 * d * 2 / link_bps  # a bf16 hidden state there and back
    guesses = profile.prefetch.experts if profile.prefetch.enabled else 0
    recall = min(1.0, PREFETCH_RECALL * guesses / top_k)
    model = CostModel(
        CostInputs(
            link_gbps=profile.device.link_gbps,
            link_latency_us=0.0,
            expert_bytes=tuple(expert_bytes),
            activation_bytes=d * 2,
            host=TokenCurve.flat(host_e[0]),
            device=TokenCurve.flat(device_e),
        )
    )
    miss_on_host = model.choose(0, [Miss(0, 1)], 0.0, 0.0, 0.0)[0] == HOST
    head = config.vocab_size * d / rate
    totals = dict.fromkeys(POLICIES, head)
    hit_rates = []
    for k, size, host_s in zip(ks, expert_bytes, host_e, strict=True):
        p = min(1.0, k / experts)
        hit = p + LOCALITY_BONUS * p * (1 - p)
        hit_rates.append(hit)
        dense = overhead + attention / rate
        link = top_k * (1 - hit) * size / link_bps
        compute = dense + top_k * device_e
        copy_only = compute + link - min(recall * link, compute / 2)
        totals["copy-only"] += copy_only
        totals["host-only"] += dense + top_k * (host_s + crossing)
        experts_time = balanced(top_k * hit, top_k * (1 - hit), device_e, host_s + crossing)
        totals["hybrid"] += dense + experts_time if miss_on_host else copy_only
    tok_s = {policy: 1.0 / seconds for policy, seconds in totals.items()}
    hit = sum(hit_rates) / len(hit_rates)
    copy_s = expert_bytes[0] / link_bps
    lines = _arithmetic(
        config, ks, expert_bytes, hit_rates[0], overhead, attention, rate, device_e, host_e[0], host_gbps,
        copy_s, miss_on_host, totals, tok_s, head, host,
    )  # fmt: skip
    return SpeedPlan(tok_s, hit, device_e, host_e[0], copy_s, miss_on_host, tuple(lines))


def balanced(hits: float, misses: float, device_e: float, host_e: float) -> float:
    """The experts' time in one layer when the host takes the misses and, while the device is behind,
    some hits (``CostModel._balance``, in expected counts)."""
    device, host = hits * device_e, misses * host_e
    moved = min(hits, max(0.0, (device - host) / (device_e + host_e)))
    return max(device - moved * device_e, host + moved * host_e)


def _arithmetic(
    config: ModelConfig,
    ks: Sequence[int],
    expert_bytes: Sequence[int],
    hit: float,
    overhead: float,
    attention: int,
    rate: float,
    device_e: float,
    host_e: float,
    host_gbps: float,
    copy_s: float,
    miss_on_host: bool,
    totals: dict[str, float],
    tok_s: dict[str, float],
    head: float,
    host: Any,
) -> list[str]:
    """The sums behind each prediction, for layer 0 (the per-layer figures are summed over every layer)."""
    ms, top_k, layers = 1e3, config.num_experts_per_tok, config.num_hidden_layers
    dense = overhead + attention / rate
    host_source = (
        "the profile's host.expert_ms" if host.expert_ms else
        f"{expert_bytes[0] / 1e6:.1f} MB / min({host.cores} cores × {HOST_GBPS_PER_CORE} GB/s, "
        f"{host.memory_gbps:g} GB/s) + {HOST_JOB_S * ms:.2f} ms"
    )  # fmt: skip
    device_source = (
        "the profile's host.device_expert_ms"
        if host.device_expert_ms
        else f"{3 * config.hidden_size * config.intermediate_size / 1e6:.0f}M weights / {rate:.3g} per s"
    )
    hits, misses = top_k * hit, top_k * (1 - hit)
    moved = min(hits, max(0.0, (hits * device_e - misses * host_e) / (device_e + host_e)))
    where = (
        f"host ({host_e * ms:.2f} < {copy_s * ms:.2f} + {device_e * ms:.2f} ms)"
        if miss_on_host
        else f"device ({copy_s * ms:.2f} + {device_e * ms:.2f} <= {host_e * ms:.2f} ms)"
    )
    return [
        f"one expert: device {device_e * ms:.2f} ms ({device_source}); host {host_e * ms:.2f} ms ({host_source}); "
        f"copy {copy_s * ms:.2f} ms ({expert_bytes[0] / 1e6:.1f} MB over the link)",
        f"layer 0: K = {ks[0]} of {config.num_local_experts}, hit rate {hit:.1%}: {hits:.2f} hits and "
        f"{misses:.2f} misses a token; dense part {dense * ms:.2f} ms ({overhead * ms:.1f} ms overhead + "
        f"{attention / 1e6:.0f}M attention weights); lm_head {head * ms:.2f} ms a token",
        f"copy-only: {layers} layers, {totals['copy-only'] * ms:.1f} ms a token -> {tok_s['copy-only']:.2f} tok/s",
        f"host-only: {layers} × ({dense * ms:.2f} + {top_k} × {host_e * ms:.2f}) + {head * ms:.2f} = "
        f"{totals['host-only'] * ms:.1f} ms -> {tok_s['host-only']:.2f} tok/s",
        f"hybrid: a miss is cheaper on the {where}; "
        + (
            f"{layers} × ({dense * ms:.2f} + max({hits - moved:.2f} × {device_e * ms:.2f}, "
            f"{misses + moved:.2f} × {host_e * ms:.2f})) + {head * ms:.2f} = {totals['hybrid'] * ms:.1f} ms "
            f"-> {tok_s['hybrid']:.2f} tok/s"
            + (f" ({moved:.2f} hits a layer moved to the idle host)" if moved > 0 else "")
            if miss_on_host
            else f"as copy-only, {tok_s['hybrid']:.2f} tok/s"
        ),
    ]
