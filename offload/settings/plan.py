"""Memory planning: bytes per tier and a predicted decode speed, from config.json alone.

No weight is read. Byte counts come from the quantization specs (the profile's, or the ``quantization``
block that ``offload convert`` wrote into config.json, which wins because it describes the stored weights).

Predicted decode speed, an estimate (per token, summed over layers l; E experts, top_k chosen):
    p_l       = min(1, K_l / E)                          chance a chosen expert sits in one of K_l slots
    hit_l     = p_l + LOCALITY_BONUS · p_l · (1 - p_l)   LRU beats chance: consecutive tokens reuse experts
    misses_l  = top_k · (1 - hit_l)
    link_l    = misses_l · expert_bytes_l / link bandwidth
    compute_l = LAYER_OVERHEAD_S + active weights of a layer / WEIGHTS_PER_S
    hidden_l  = min(recall · link_l, compute_l / 2)      prefetched copies overlap the experts' half of a layer
    t_l       = compute_l + link_l - hidden_l
    tok/s     = 1 / (Σ t_l + lm_head weights / WEIGHTS_PER_S)
with recall = min(1, PREFETCH_RECALL · guesses / top_k), 0 without prefetch. Wrong guesses are taken to
cost no link time. With the CUDA constants below the formula gives the eight "full" and "without prefetch"
figures of arXiv 2312.17238 (A100, RTX 3080 Mobile, RTX 3060, T4; 66 MB experts; their K) within 30%.
``offload bench`` measures the real figures. That is the copy-only engine's speed (``predicted_tok_s``);
``offload.settings.plan_speed`` adds the other policies (``speeds``); the run's, by ``--host-compute`` and the
profile, is the headline (``run_tok_s``, ``offload.settings.plan_policy``).
With a host budget (``[host] memory_gib``) ``offload.settings.plan_tiers`` sizes the host tier, the experts
left on disk, the disk time (and host builds) added to each token (``predicted_tok_s`` counts it), the peak RSS.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from offload.config import ModelConfig
from offload.errors import QuantError
from offload.quant.codec import expert_nbytes
from offload.quant.linear import matrix_nbytes
from offload.quant.scheme import QuantScheme
from offload.quant.spec import QuantSpec
from offload.settings.plan_inputs import (
    budget_bytes,
    context_notice,
    default_context,
    fill_slots,
    run_dtype,
    stored_scheme,
    with_cores,
)
from offload.settings.plan_policy import check_host_compute, hybrid_builds, mode_figures
from offload.settings.plan_speed import (
    LAYER_OVERHEAD_S,
    LOCALITY_BONUS,
    PREFETCH_RECALL,
    WEIGHTS_PER_S,
    Roles,
    SpeedPlan,
    host_build_seconds,
    predict_speeds,
)
from offload.settings.plan_tiers import (
    HostTier,
    PeakRss,
    disk_arithmetic,
    hit_rate,
    peak_rss,
    plan_host_tier,
    tier_rows,
    with_disk,
    with_disk_line,
    with_tiers,
)
from offload.settings.profile import CacheSettings, Profile

GIB = 1024**3
# CUDA context, cuBLAS workspace and allocator fragmentation: what a CUDA process holds beyond its tensors.
CUDA_RESERVE_BYTES = 512 * 1024**2
PREFILL_CHUNK = 512  # tokens per prefill step; bounds the activations of a long prompt


@dataclass(frozen=True)
class DenseBytes:
    """Device bytes of everything but the experts."""

    attention: int  # q, k, v, o of every layer
    gate: int  # every layer's router
    norms: int  # two RMSNorms per layer and the final one
    embed: int
    lm_head: int  # 0 when tied to the embedding

    @property
    def total(self) -> int:
        return self.attention + self.gate + self.norms + self.embed + self.lm_head


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per tier for one model, profile and context, and the predicted decode speed."""

    model: str  # where config.json was read
    profile: str
    device_kind: str
    context: int  # KV cache length in tokens
    compute_dtype: str
    experts_per_layer: tuple[int, ...]  # K_l after "auto" / "all" resolution
    offloaded: bool  # False for "all": every expert resident on the device, no host store behind it
    expert_specs: tuple[str, ...]  # per layer
    expert_bytes: tuple[int, ...]  # one expert's stored bytes, per layer
    num_local_experts: int
    dense: DenseBytes
    kv_cache_bytes: int
    workspace_bytes: int
    budget_bytes: int
    link_gbps: float
    expected_hit_rate: float  # mean over layers, from the formula in the module docstring
    miss_bytes_per_token: int
    predicted_tok_s: (
        float  # an estimate: the copy-only engine (the paper's formula); host-only from a tier; + disk
    )
    speeds: SpeedPlan | None = None  # every policy's estimate, with its arithmetic
    host_tier: HostTier | None = None  # None: every expert resident on the device, no host store
    # Every expert "resident" and a host budget: no slots; the experts run on the host, from the tier.
    experts_from_host_tier: bool = False
    peak_rss: PeakRss | None = None  # the process's predicted peak RSS (host memory)
    tok_s_with_disk: dict[str, float] | None = None  # each policy's estimate with the disk reads added
    notices: tuple[str, ...] = ()  # one line each: where the run's rules changed what the plan was given
    host_cores: int = 4  # the host's cores the plan counted ([host] cores, "auto" made this machine's)
    host_compute: str = (
        "auto"  # where the run computes its misses: --host-compute, else the profile's [host] compute
    )
    tok_s_by_mode: dict[str, float] | None = (
        None  # each --host-compute mode's estimate (disk included); offloaded only
    )
    run_tok_s: float | None = (
        None  # the headline: the run's policy's estimate (``plan_policy``), disk included
    )

    @property
    def disk_bytes(self) -> int:
        """The experts beyond the host budget: read from the checkpoint on disk when needed."""
        return 0 if self.host_tier is None else self.host_tier.disk_bytes

    @property
    def expert_slot_bytes(self) -> int:
        if self.experts_from_host_tier:
            return 0
        return sum(k * size for k, size in zip(self.experts_per_layer, self.expert_bytes, strict=True))

    @property
    def device_bytes(self) -> int:
        return self.dense.total + self.expert_slot_bytes + self.kv_cache_bytes + self.workspace_bytes

    @property
    def host_bytes(self) -> int:
        """The host tier's experts: every expert of every layer when offloaded (the host tier is inclusive),
        only those the host budget holds when there is one, nothing when every expert is resident."""
        return 0 if self.host_tier is None else self.host_tier.bytes

    @property
    def needed_bytes(self) -> int:
        """What must fit the budget: the device tier, plus the host tier on a CPU, where both share the RAM."""
        return self.device_bytes + (self.host_bytes if self.device_kind == "cpu" else 0)

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.budget_bytes

    def rows(self) -> list[tuple[str, str, int, str]]:
        """(tier, item, bytes, note) for a table."""
        ks = sorted(set(self.experts_per_layer))
        k_text = str(ks[0]) if len(ks) == 1 else f"{min(ks)}..{max(ks)}"
        specs = ", ".join(sorted(set(self.expert_specs)))
        total = sum(self.experts_per_layer)
        slots_note = (
            "none: the experts run from the host tier"
            if self.experts_from_host_tier
            else f"K = {k_text} per layer, {total} slots, {specs}"
        )
        rows = [
            ("device", "attention", self.dense.attention, "q, k, v, o"),
            ("device", "embed + lm_head", self.dense.embed + self.dense.lm_head, ""),
            ("device", "gates + norms", self.dense.gate + self.dense.norms, ""),
            ("device", "expert slots", self.expert_slot_bytes, slots_note),
            ("device", "KV cache", self.kv_cache_bytes, f"{self.context} tokens, {self.compute_dtype}"),
            ("device", "workspace", self.workspace_bytes, "activations, dequant scratch, runtime reserve"),
            ("device", "total", self.device_bytes, f"budget {self.budget_bytes / GIB:.2f} GiB"),
        ]
        return rows + tier_rows(self.host_tier, self.peak_rss, self.num_local_experts, self.device_kind)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, the derived totals, and the rows."""
        out: dict[str, Any] = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["dense"] = {**vars(self.dense), "total": self.dense.total}
        out["speeds"] = None if self.speeds is None else self.speeds.as_dict()
        out["host_tier"] = None if self.host_tier is None else self.host_tier.as_dict()
        out["peak_rss"] = None if self.peak_rss is None else self.peak_rss.as_dict()
        for name in ("experts_per_layer", "expert_specs", "expert_bytes"):
            out[name] = list(out[name])
        out.update(
            expert_slot_bytes=self.expert_slot_bytes,
            device_bytes=self.device_bytes,
            needed_bytes=self.needed_bytes,
            host_bytes=self.host_bytes,
            fits=self.fits,
            disk_bytes=self.disk_bytes,
            predicted_peak_rss_bytes=None if self.peak_rss is None else self.peak_rss.total,
            predicted_tok_s_is_estimate=True,
        )
        return out


def plan_memory(
    config: ModelConfig,
    profile: Profile,
    context: int,
    free_memory_bytes: int | None = None,
    *,
    compute_dtype: str | None = None,
    source: str = "config.json",
    host_memory_source: str | None = None,
    host_compute: str | None = None,
) -> MemoryPlan:
    """Plan the device and host tiers of ``config`` under ``profile`` with a KV cache of ``context`` tokens.

    The budget is the profile's ``device.memory_gib``, capped by ``free_memory_bytes`` when given; an
    ``auto`` profile fills it (``resolve_auto_experts``). ``host_memory_source`` names where the host
    budget came from (a flag) in its errors; by default the profile's key. ``compute_dtype``: ``--dtype``;
    None plans the dtype a run would pick (``plan_inputs.run_dtype``). ``host_compute``: ``--host-compute``;
    None plans the profile's ``[host] compute``.
    """
    mode = check_host_compute(host_compute or profile.host.compute)
    profile, cores_notice = with_cores(profile)  # [host] cores = "auto": this machine's
    # A bundled profile's context is sized for Mixtral; a smaller model's window caps it, as at load.
    resolved = profile.for_model(config)
    scheme, where = stored_scheme(config, resolved, source)
    dtype_name, dtype_notice = run_dtype(config, profile, scheme, compute_dtype)  # as a run picks it
    notices = tuple(filter(None, (context_notice(config, profile, context), dtype_notice, cores_notice)))
    context = min(context, config.max_position_embeddings)
    dtype = getattr(torch, dtype_name)
    layer_specs = [scheme.expert_spec(layer) for layer in range(config.num_hidden_layers)]
    try:
        dense = _dense_bytes(config, scheme, dtype)
        d, f = config.hidden_size, config.intermediate_size
        expert_bytes = tuple(expert_nbytes(spec, d, f, dtype) for spec in layer_specs)
    except QuantError as err:  # e.g. a group size that does not divide this model's rows
        raise QuantError(f"{where}: {err}") from None
    kv = kv_cache_bytes(config, context, dtype)
    workspace = workspace_bytes(config, profile.device.kind, context, dtype, layer_specs)
    budget = budget_bytes(profile, free_memory_bytes)
    if resolved.experts_per_layer is None:
        ks = fill_slots(
            budget - dense.total - kv - workspace, expert_bytes, config.num_local_experts, profile
        )
    else:
        ks = resolved.experts_per_layer
    offloaded = profile.cache.experts_per_layer != "all"
    # Every expert "resident" but a host budget: the engine computes them on the host from the tier.
    from_tier = not offloaded and profile.host.memory_gib is not None
    hit, miss_bytes, _ = _predict(config, profile, ks, expert_bytes)
    speeds = predict_speeds(
        config, profile, ks, expert_bytes, _roles(scheme, dense, layer_specs, config, dtype_name)
    )
    tok_s = speeds.tok_s["copy-only"]  # _predict's on CUDA; on a CPU device, by its kernels
    tier = tiers = None
    if offloaded or from_tier:
        tiers = {  # with slots in front of the tier, and without (host-only, or a CPU computing from it)
            front: plan_host_tier(
                memory_gib=profile.host.memory_gib,
                disk_gbps=profile.host.disk_gbps,
                where=host_memory_source or f"{profile.source}: host.memory_gib = {profile.host.memory_gib}",
                device_slots=ks if front else None,
                expert_bytes=expert_bytes,
                experts=config.num_local_experts,
                top_k=config.num_experts_per_tok,
                locality_bonus=LOCALITY_BONUS,
                build_seconds=[host_build_seconds(s, 3 * d * f, profile.host.cores) for s in layer_specs],
            )
            for front in ((False,) if from_tier else (True, False))
        }
        tier = tiers[not from_tier]
        if from_tier:  # HostOnlyExperts: the host-only policy's arithmetic
            tok_s = speeds.tok_s.get("host-only", tok_s)
        tok_s = with_disk(tok_s, tier.miss_seconds(on_host=from_tier))  # + builds where the host computes
    tok_s_with_disk = None
    if tiers is not None:
        tok_s_with_disk = with_tiers(tiers, speeds.tok_s, from_tier, hybrid_builds(speeds))
        if tier.memory_gib is not None:  # experts on disk: the sums go on to the speeds with their reads
            line = disk_arithmetic(tiers, speeds.tok_s, from_tier, hybrid_builds(speeds))
            speeds = replace(speeds, arithmetic=with_disk_line(speeds.arithmetic, line))
    by_mode = mode_figures(speeds, tiers, from_tier, profile.device.kind) if offloaded else None
    device_total = dense.total + kv + workspace
    if not from_tier:
        device_total += sum(k * size for k, size in zip(ks, expert_bytes, strict=True))
    rss = peak_rss(
        host_tier_bytes=0 if tier is None else tier.bytes,
        device_bytes=device_total,
        device_kind=profile.device.kind,
        largest_tensor=max(dense.embed, dense.lm_head, *expert_bytes),
    )
    return MemoryPlan(
        model=source,
        profile=profile.name,
        device_kind=profile.device.kind,
        context=context,
        compute_dtype=dtype_name,
        experts_per_layer=tuple(ks),
        offloaded=offloaded,
        expert_specs=tuple(str(spec) for spec in layer_specs),
        expert_bytes=expert_bytes,
        num_local_experts=config.num_local_experts,
        dense=dense,
        kv_cache_bytes=kv,
        workspace_bytes=workspace,
        budget_bytes=budget,
        link_gbps=profile.device.link_gbps,
        expected_hit_rate=hit,
        miss_bytes_per_token=miss_bytes,
        predicted_tok_s=tok_s,
        speeds=speeds,
        host_tier=tier,
        experts_from_host_tier=from_tier,
        peak_rss=rss,
        tok_s_with_disk=tok_s_with_disk,
        notices=notices,
        host_cores=profile.host.cores,
        host_compute=mode,
        tok_s_by_mode=by_mode,
        run_tok_s=tok_s if by_mode is None else by_mode[mode],
    )


def resolve_auto_experts(
    config: ModelConfig,
    profile: Profile,
    free_memory_bytes: int | None,
    *,
    context: int | None = None,
    compute_dtype: str | None = None,
) -> list[int]:
    """The largest K per layer (≤ E) whose slots fill the budget left after dense weights, KV and workspace.

    Slots are handed out one per layer in turn, so K differs by at most one between layers of equal
    expert size; a layer whose next slot does not fit is skipped while a smaller one still fits.
    """
    auto = replace(profile, cache=CacheSettings("auto"))
    context = context or default_context(config, profile)
    plan = plan_memory(config, auto, context, free_memory_bytes, compute_dtype=compute_dtype)
    return list(plan.experts_per_layer)


def kv_cache_bytes(config: ModelConfig, context: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for ``context`` tokens."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * context * dtype.itemsize


def workspace_bytes(
    config: ModelConfig, kind: str, context: int, dtype: torch.dtype, expert_specs: list[QuantSpec]
) -> int:
    """Transient device memory: one prefill chunk's activations and attention scores, the dense copy of one
    quantized expert while it runs, fp32 logits, and on CUDA the runtime's own reserve."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    chunk = min(PREFILL_CHUNK, context)
    # fp32 upper bound: residual, normed input, q/k/v/o and the two SwiGLU halves of one chunk.
    activations = chunk * (4 * hidden + 2 * ffn) * 4
    scores = config.num_attention_heads * chunk * context * 4  # SDPA kernels may not materialise these
    quantized = any(spec.backend != "none" for spec in expert_specs)
    dequant = 3 * hidden * ffn * dtype.itemsize if quantized else 0
    logits = config.vocab_size * 4
    reserve = CUDA_RESERVE_BYTES if kind == "cuda" else 0
    return activations + scores + dequant + logits + reserve


def _dense_bytes(config: ModelConfig, scheme: QuantScheme, dtype: torch.dtype) -> DenseBytes:
    d, layers, hd = config.hidden_size, config.num_hidden_layers, config.head_dim
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = [(q_out, d), (kv_out, d), (kv_out, d), (d, q_out)]
    attention = layers * sum(matrix_nbytes(scheme.attention, shape, dtype) for shape in shapes)
    gate = layers * matrix_nbytes(scheme.gate, (config.num_local_experts, d), dtype)
    norms = (2 * layers + 1) * d * dtype.itemsize
    embed = matrix_nbytes(scheme.embed, (config.vocab_size, d), dtype)
    lm_head = (
        0 if config.tie_word_embeddings else matrix_nbytes(scheme.lm_head, (config.vocab_size, d), dtype)
    )
    return DenseBytes(attention=attention, gate=gate, norms=norms, embed=embed, lm_head=lm_head)


def _roles(
    config_scheme: QuantScheme, dense: DenseBytes, specs: list[QuantSpec], config: ModelConfig, dtype: str
) -> Roles:
    """The specs and bytes ``plan_speed`` times each matrix by (a tied lm_head is the embedding)."""
    head = (config_scheme.lm_head, dense.lm_head) if dense.lm_head else (config_scheme.embed, dense.embed)
    attention = dense.attention // config.num_hidden_layers
    return Roles(config_scheme.attention, attention, head[0], head[1], tuple(specs), dtype)


def _predict(
    config: ModelConfig,
    profile: Profile,
    ks: tuple[int, ...] | list[int],
    expert_bytes: tuple[int, ...],
) -> tuple[float, int, float]:
    """(mean expected hit rate, expected bytes moved per token, predicted tok/s): see the module docstring."""
    kind, top_k, experts = profile.device.kind, config.num_experts_per_tok, config.num_local_experts
    link_bps = profile.device.link_gbps * 1e9
    rate, overhead = WEIGHTS_PER_S[kind], LAYER_OVERHEAD_S[kind]
    d, f = config.hidden_size, config.intermediate_size
    q_out, kv_out = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    # Quantized kernels cost per weight (dequantize, then multiply), whatever the bit width.
    active = 2 * d * (q_out + kv_out) + top_k * 3 * d * f
    guesses = profile.prefetch.experts if profile.prefetch.enabled else 0
    recall = min(1.0, PREFETCH_RECALL * guesses / top_k)
    hits, moved, seconds = [], 0.0, config.vocab_size * d / rate
    for k, size in zip(ks, expert_bytes, strict=True):
        hit = hit_rate(k, experts, LOCALITY_BONUS)
        miss_bytes = top_k * (1 - hit) * size
        link = miss_bytes / link_bps
        compute = overhead + active / rate
        seconds += compute + link - min(recall * link, compute / 2)
        hits.append(hit)
        moved += miss_bytes
    return sum(hits) / len(hits), round(moved), 1.0 / seconds
