"""Predicted decode speed per policy (copy-only, host-only, hybrid), with the arithmetic shown.

Per token, summed over layers l (E experts, top_k chosen, K_l slots), at batch 1:
    p_l       = min(1, K_l / E);  hit_l = p_l + LOCALITY_BONUS · p_l · (1 - p_l)
    hits_l    = top_k · hit_l;    misses_l = top_k · (1 - hit_l)
    copy_e    = expert bytes / link GB/s
    copy-only: the paper's engine, with the constants fitted to its figures (``offload.settings.plan``):
               t_l = dense_l + top_k · device_e + link_l - min(recall · link_l, compute_l / 2),
               dense_l = LAYER_OVERHEAD_S + attention weights / WEIGHTS_PER_S, device_e = 3·D·F / WEIGHTS_PER_S;
               on a CPU device, which the paper never measured, the same sum with our engine's terms below
    our engine (host-only and hybrid), each matrix timed by the kernel that runs it (``matrix_seconds``):
      ours_l   = ENGINE_LAYER_OVERHEAD_S + the attention's time on the device
      device_e = one expert on the device: on CUDA, its bytes / (device memory GB/s · GPU_BANDWIDTH_SHARE) for a
                 kernel that streams them (dense, or int4 on a GPU of compute capability 8.0 or more:
                 ``int4_gpu_kernel_runs``), else the paper's per-weight rate; on a CPU device, as host_e for an int4 or int8 kernel, else a dense
                 matmul at DENSE_CPU_WEIGHTS_PER_S_PER_CORE (such a spec is dequantized once, at load)
      host_e   = one expert on the host: bytes / min(cores · HOST_GBPS_PER_CORE[kernel], memory GB/s) + HOST_JOB_S
                 for a spec with a CPU kernel, else 3·D·F / (cores · HOST_DEQUANT_WEIGHTS_PER_S_PER_CORE)
      host-only: t_l = ours_l + top_k · (host_e + 2 · D · 2 bytes / link)        (llama.cpp --cpu-moe)
      hybrid:    a miss goes where ``offload.experts.cost_model`` says (host_e against copy_e + device_e), each
                 side timed in these terms, copied misses with prefetch counted as copy-only counts it, the idle
                 host taking hits while the device is behind (``offload.settings.plan_hybrid``: never slower than
                 host-only, nor than copying every miss in these terms). On a CPU device the host is the device:
                 misses stay there (hybrid = copy-only) and host-only is every expert computed there (the resident
                 speed). ``always_tok_s``: --host-compute always, every miss on the host (``plan_hybrid``)
    tok/s      = 1 / (Σ t_l + lm_head), the lm_head at the paper's rate for copy-only, by its kernel for ours
Assumptions: the host streams an expert's stored bytes once per token (a kernel that reads the packed codes,
memory- or core-bound, whichever binds); hybrid keeps the copy-only hit rate (its idle-link copies keep the
cache warm); host work does not slow the device's launches; a layer's host-side time
(ENGINE_LAYER_OVERHEAD_S) and its device work add up, none of it overlapping. A profile's [host] ``expert_ms``
and ``device_expert_ms`` replace host_e and device_e.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from offload.config import ModelConfig
from offload.experts.cost_model import HOST, CostInputs, CostModel, Miss, TokenCurve
from offload.quant.host_kernels import INT4_GROUP_SIZES
from offload.quant.spec import QuantSpec
from offload.settings.plan_hybrid import balanced, layer_times, speed_sums
from offload.settings.plan_tiers import hit_rate

__all__ = ["balanced"]  # re-exported: it lived here

LOCALITY_BONUS = 0.3
PREFETCH_RECALL = 0.6  # share of needed experts that top_k guesses catch one layer ahead (assumed)
# The paper's engine (arXiv 2312.17238's code): fitted so that the copy-only formula gives its eight published
# figures within 30% (tests/test_plan.py). Its per-layer overhead is its own; ours is ENGINE_LAYER_OVERHEAD_S.
LAYER_OVERHEAD_S = {"cuda": 2e-3, "cpu": 0.5e-3}  # Python, kernel launches, the one host sync per layer
# Active weights a decode step gets through per second, for a kernel that dequantizes (then multiplies) at
# every call, which costs per weight whatever the bit width. CPU: 2 cores run dense bf16 at about 8e9 and hqq
# (dequantize on every call) at about 1.3e9 (FACTS.md); cached dequantized experts sit between.
WEIGHTS_PER_S = {"cuda": 50e9, "cpu": 2e9}
# Our engine's host-side time per decoder layer at decode: Python, torch's dispatch and the expert cache's
# bookkeeping. Measured (session 9, after our CPU kernels): `OMP_NUM_THREADS=1 python benchmarks/layer_overhead.py
# --threads 1 --runs 7 --new-tokens 64` gave 0.51 and 0.45 ms a layer through the cache (K = E, every expert a
# hit; resident 0.35 / 0.30 ms, K = 4 copying misses 0.75 / 0.72 ms) on the demo model, whose matmuls take
# microseconds, on the 2-core build machine at load 0.8 to 1.0 (docs/BENCHMARKS.md; 0.98 ms under load 5 in
# session 3). On a GPU the same Python launches the kernels, which run behind it until the layer's one
# synchronisation.
ENGINE_LAYER_OVERHEAD_S = 0.5e-3
# The share of the datasheet memory bandwidth a GPU kernel that streams its weights reaches at batch 1: gpt-fast's
# README (Llama-2-7B, batch 1, torch.compile, on an A100-80GB SXM: 2039 GB/s) gives 1397.31 GB/s in bf16 and
# 862.69 GB/s in int4 with groups of 32 (torch's _weight_int4pack_mm).
GPU_BANDWIDTH_SHARE = {"dense": 1397.31 / 2039, "int4": 862.69 / 2039}
# Whether our CUDA path runs torch's int4 kernel for hqq 4-bit weights (hqq:4:G, G 32 to 256). It does:
# hqq_backend.device_linear builds offload.quant.device_kernels.CudaInt4Linear, once a probe at load has checked
# the kernel against the dequantized matmul on that GPU (else hqq's HQQLinear, which dequantizes the whole matrix
# at every call). The kernel is compiled for compute capability 8.0 and up only: a profile's GPU below that, or one
# whose [device] compute_capability is not given ("auto"), is planned at HQQLinear's rate.
INT4_GPU_KERNEL_WIRED = True
INT4_GPU_MIN_CAPABILITY = 8.0
# CPU kernels at batch 1 on one thread, one 14336 x 4096 matrix (issue 15, FACTS.md), as GB/s of the bytes read:
# int4 29.4 MB of codes in 3.8 ms, int8 58.7 MB in 8.6 ms, a bf16 F.linear 117 MB in 16 ms.
HOST_GBPS_PER_CORE = {"int4": 7.7, "int8": 6.8, "dense": 7.3}
HOST_DEQUANT_WEIGHTS_PER_S_PER_CORE = 0.65e9  # hqq without a CPU kernel: about 1.3e9 on 2 cores (FACTS.md)
# A dense F.linear on one core, same matrix: 58.7M weights in 21.5 ms (float32) and 16 ms (bfloat16). On a CPU
# device every spec without a CPU kernel runs this way: it is dequantized once, when its slot is filled.
DENSE_CPU_WEIGHTS_PER_S_PER_CORE = {"float32": 2.73e9, "bfloat16": 3.67e9}
HOST_JOB_S = 50e-6  # handing one expert to the host thread and back
# Building a 4-bit expert for the CPU int4 kernel in its host-tier slot after its read (``offload.experts.in_place``,
# ``hqq_backend.host_linear(..., overwrite=True)``): 71.5 ms for one Mixtral expert, 3 x 14336 x 4096 weights of
# hqq:4:64 (99 MB), at one thread (docs/BENCHMARKS.md, "Built straight over the slot"; benchmarks/int4_repack.py).
HOST_INT4_BUILD_WEIGHTS_PER_S = 3 * 14336 * 4096 / 71.5e-3  # about 2.46e9, one thread
# The tier's one reader thread builds with the run's torch threads, but only part of the build spreads over them:
# `benchmarks/int4_build_threads.py` (on a worker thread, as the tier) gave a median 59.9 ms at one thread and
# 44.6 ms at two (1.34x, twice the CPU time), so about half is parallel (Amdahl: 1 / (0.5 + 0.5 / 2) = 1.33).
# Only 2 cores here: more cores are extrapolated. docs/BENCHMARKS.md, "What `offload plan` predicts".
HOST_INT4_BUILD_PARALLEL_SHARE = 0.5
POLICIES = ("copy-only", "host-only", "hybrid")


@dataclass(frozen=True)
class Roles:
    """What the plan knows of the stored weights: each role's spec and the bytes of one layer's share."""

    attention: QuantSpec
    attention_bytes: int  # q, k, v, o of one layer
    lm_head: QuantSpec
    lm_head_bytes: int
    experts: tuple[QuantSpec, ...]  # per layer
    compute_dtype: str = "bfloat16"  # what a dense matmul runs in


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
    device_kernel: str = "paper rate"  # how device_expert_s was found (``matrix_seconds``)
    # host-only and hybrid if torch's int4 GPU kernel ran the 4-bit weights; None when it changes nothing
    with_int4_kernel: dict[str, float] | None = None
    # host-only and hybrid where it runs but were not to (its probe failing at load); None when it does not run
    without_int4_kernel: dict[str, float] | None = None
    # whether tok_s counts on torch's int4 GPU kernel (``int4_gpu_kernel_runs``)
    int4_gpu_kernel: bool = False
    always_tok_s: float = 0.0  # --host-compute always: every miss on the host (``plan_hybrid``)

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "arithmetic": list(self.arithmetic)}


def int4_gpu_kernel_runs(profile: Any) -> bool:
    """Whether torch's int4 kernel runs 4-bit weights on ``profile``'s device: a CUDA GPU whose
    ``[device] compute_capability`` is 8.0 or more."""
    capability = profile.device.compute_capability
    return (
        INT4_GPU_KERNEL_WIRED
        and profile.device.kind == "cuda"
        and capability is not None
        and capability >= INT4_GPU_MIN_CAPABILITY
    )


def gpu_kernel(spec: QuantSpec, int4_wired: bool = False) -> str | None:
    """The GPU kernel that streams ``spec``'s stored bytes in our engine: "dense" (cuBLAS), "int4" (torch's
    _weight_int4pack_mm, hqq 4-bit with groups of 32 to 256, where ``int4_wired``: it runs on the GPU), or None
    (hqq's HQQLinear, dequantized per call)."""
    if spec.backend == "none":
        return "dense"
    if int4_wired and spec.backend == "hqq" and spec.bits == 4 and spec.group_size in INT4_GROUP_SIZES:
        return "int4"
    return None


def cpu_kernel(spec: QuantSpec) -> str | None:
    """The CPU kernel that runs ``spec`` from its stored bytes (``offload.quant.host_kernels``), or None."""
    if spec.backend == "none":
        return "dense"
    if spec.backend == "hqq" and spec.bits == 4 and spec.group_size in INT4_GROUP_SIZES:
        return "int4"
    if spec.backend == "bnb" and spec.kind == "int8":
        return "int8"
    return None


def host_seconds(spec: QuantSpec, nbytes: int, weights: int, host: Any) -> tuple[float, str]:
    """One matrix (or expert) of ``nbytes`` stored bytes and ``weights`` weights on the host, and how."""
    kernel = cpu_kernel(spec)
    if kernel is None:
        rate = host.cores * HOST_DEQUANT_WEIGHTS_PER_S_PER_CORE
        return weights / rate, f"{weights / 1e6:.0f}M weights dequantized per call at {rate:.3g}/s"
    gbps = min(host.cores * HOST_GBPS_PER_CORE[kernel], host.memory_gbps)
    why = (
        f"{nbytes / 1e6:.1f} MB / min({host.cores} cores × {HOST_GBPS_PER_CORE[kernel]} GB/s, "
        f"{host.memory_gbps:g} GB/s), {kernel} kernel"
    )
    return nbytes / (gbps * 1e9), why


def host_build_seconds(spec: QuantSpec, weights: int, cores: int = 1) -> float:
    """Building one expert of ``weights`` weights for the host's kernel after a host-tier read, on ``cores``: the
    int4 repack, HOST_INT4_BUILD_WEIGHTS_PER_S on one thread, its parallel share spread over the cores; 0 for a
    spec whose host expert keeps the stored bytes as they are (int8, dense) or dequantizes at every call (priced
    per call by ``host_seconds``)."""
    if cpu_kernel(spec) != "int4":
        return 0.0
    share = HOST_INT4_BUILD_PARALLEL_SHARE
    return weights / HOST_INT4_BUILD_WEIGHTS_PER_S * (1 - share + share / cores)


def matrix_seconds(
    spec: QuantSpec,
    nbytes: int,
    weights: int,
    profile: Any,
    int4_wired: bool = False,
    dtype: str = "bfloat16",
) -> tuple[float, str]:
    """One matrix (or expert) on the device in our engine, and how the time was found.

    CUDA: its bytes at GPU_BANDWIDTH_SHARE of ``[device] memory_gbps`` for a kernel that streams them, else
    (no such kernel, or no memory_gbps) the paper's per-weight rate. A CPU device is the host (its [host]
    cores and memory): ``host_seconds`` for a spec with an int4 or int8 kernel, else a dense matmul in ``dtype``.
    """
    kind = profile.device.kind
    if kind == "cpu":
        if cpu_kernel(spec) in ("int4", "int8"):
            return host_seconds(spec, nbytes, weights, profile.host)
        per_core = DENSE_CPU_WEIGHTS_PER_S_PER_CORE.get(dtype, DENSE_CPU_WEIGHTS_PER_S_PER_CORE["float32"])
        cores, itemsize = profile.host.cores, 2 if dtype in ("bfloat16", "float16") else 4
        seconds = max(weights / (cores * per_core), weights * itemsize / (profile.host.memory_gbps * 1e9))
        return seconds, f"{weights / 1e6:.0f}M weights, dense {dtype} on {cores} cores × {per_core:.3g}/s"
    else:
        kernel, gbps = gpu_kernel(spec, int4_wired), profile.device.memory_gbps
        if kernel is not None and gbps is not None:
            share = GPU_BANDWIDTH_SHARE[kernel]
            why = f"{nbytes / 1e6:.1f} MB / ({gbps:g} GB/s × {share:.2f}), {kernel} kernel"
            return nbytes / (gbps * share * 1e9), why
    rate = WEIGHTS_PER_S[kind]
    return weights / rate, f"{weights / 1e6:.0f}M weights / {rate:.3g} per s"


def predict_speeds(
    config: ModelConfig,
    profile: Any,
    ks: Sequence[int],
    expert_bytes: Sequence[int],
    roles: Roles,
    *,
    int4_wired: bool | None = None,
    alternative: bool = True,
) -> SpeedPlan:
    """Every policy's predicted decode speed for ``config`` with K_l = ``ks`` under ``profile``.

    ``int4_wired``: whether torch's int4 kernel runs the 4-bit weights on the GPU (default: where the profile's
    GPU supports it, ``int4_gpu_kernel_runs``). With ``alternative``, the other case is shown as well.
    """
    if int4_wired is None:
        int4_wired = int4_gpu_kernel_runs(profile)
    kind, top_k, experts = profile.device.kind, config.num_experts_per_tok, config.num_local_experts
    host, link_bps = profile.host, profile.device.link_gbps * 1e9
    rate, overhead = WEIGHTS_PER_S[kind], LAYER_OVERHEAD_S[kind]
    d, f = config.hidden_size, config.intermediate_size
    q_out, kv_out = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attention, expert_weights, head_weights = 2 * d * (q_out + kv_out), 3 * d * f, config.vocab_size * d
    dtype = roles.compute_dtype
    # our engine, per matrix by the kernel that runs it
    attention_s, _ = matrix_seconds(
        roles.attention, roles.attention_bytes, attention, profile, int4_wired, dtype
    )
    head_s, head_why = matrix_seconds(
        roles.lm_head, roles.lm_head_bytes, head_weights, profile, int4_wired, dtype
    )
    ours_dense = ENGINE_LAYER_OVERHEAD_S + attention_s
    # copy-only: the paper's engine and constants on CUDA; on a CPU device (no paper figure) ours
    on_cpu = kind == "cpu"
    paper_device_e = host.device_expert_ms * 1e-3 if host.device_expert_ms else expert_weights / rate
    paper_dense, paper_head = (
        (ours_dense, head_s) if on_cpu else (overhead + attention / rate, head_weights / rate)
    )
    device_e, device_why = [], []
    host_e, host_why = [], []
    for spec, size in zip(roles.experts, expert_bytes, strict=True):
        seconds, why = matrix_seconds(spec, size, expert_weights, profile, int4_wired, dtype)
        device_e.append(host.device_expert_ms * 1e-3 if host.device_expert_ms else seconds)
        device_why.append("the profile's host.device_expert_ms" if host.device_expert_ms else why)
        seconds, why = host_seconds(spec, size, expert_weights, host)
        host_e.append(host.expert_ms * 1e-3 if host.expert_ms else seconds + HOST_JOB_S)
        host_why.append(
            "the profile's host.expert_ms" if host.expert_ms else f"{why} + {HOST_JOB_S * 1e3:.2f} ms"
        )
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
            device=TokenCurve.flat(device_e[0]),
        )
    )
    # A CPU device keeps its misses: the host is the same CPU (``offload.hybrid.uses_host``).
    miss_on_host = not on_cpu and model.choose(0, [Miss(0, 1)], 0.0, 0.0, 0.0)[0] == HOST
    totals = {"copy-only": paper_head, "host-only": head_s, "hybrid": head_s}
    hit_rates, always, layers = [], head_s, []
    for k, size, device_s, host_s in zip(ks, expert_bytes, device_e, host_e, strict=True):
        hit = hit_rate(k, experts, LOCALITY_BONUS)
        hit_rates.append(hit)
        link = top_k * (1 - hit) * size / link_bps
        compute = paper_dense + top_k * (device_s if on_cpu else paper_device_e)
        totals["copy-only"] += compute + link - min(recall * link, compute / 2)
        # on a CPU device every expert already computes on the host: the resident speed
        totals["host-only"] += ours_dense + top_k * (device_s if on_cpu else host_s + crossing)
        layer = layer_times(
            top_k * hit, top_k * (1 - hit), device_s, host_s, size / link_bps, crossing=crossing,
            dense=ours_dense, recall=recall, miss_on_host=miss_on_host, on_cpu=on_cpu,
        )  # fmt: skip
        layers.append(layer)
        totals["hybrid"] += ours_dense + layer.hybrid
        always += ours_dense + layer.always
    tok_s = {policy: 1.0 / seconds for policy, seconds in totals.items()}
    other, other_lines = None, []
    int4_specs = any(gpu_kernel(spec, True) == "int4" for spec in (roles.attention, *roles.experts))
    if alternative and int4_specs and kind == "cuda" and profile.device.memory_gbps is not None:
        flipped = predict_speeds(
            config, profile, ks, expert_bytes, roles, int4_wired=not int4_wired, alternative=False
        )
        other = {policy: flipped.tok_s[policy] for policy in ("host-only", "hybrid")}
        other_lines = [flipped.arithmetic[i] for i in (0, 1, 3, 4)]
    copy_s = expert_bytes[0] / link_bps
    whys = (device_why[0], host_why[0], head_why)
    lines = speed_sums(
        config, ks, expert_bytes, layers[0], ours_dense, attention_s, whys, totals, head_s, on_cpu
    )
    if miss_on_host and not int4_wired and cpu_kernel(roles.experts[0]) == "int4":
        # The host store keeps the CPU kernel's layout only where the GPU runs torch's int4 kernel (``loading.
        # host_forms``): HQQLinear, the fallback, reads hqq's layout, so each host job repacks its expert.
        lines.append(
            "  (without torch's int4 GPU kernel the host store keeps hqq's layout for HQQLinear, so each host job "
            "first rebuilds its expert for the CPU kernel: the engine's load-time probe counts that, these sums "
            "do not)"
        )
    if other is not None:
        lines.append(_int4_line(profile, int4_wired, other))
        lines += [f"  {line}" for line in other_lines]
    return SpeedPlan(
        tok_s=tok_s,
        hit_rate=sum(hit_rates) / len(hit_rates),
        device_expert_s=device_e[0],
        host_expert_s=host_e[0],
        copy_s=copy_s,
        miss_on_host=miss_on_host,
        arithmetic=tuple(lines),
        device_kernel=device_why[0],
        with_int4_kernel=None if int4_wired else other,
        without_int4_kernel=other if int4_wired else None,
        int4_gpu_kernel=int4_wired and int4_specs and kind == "cuda",
        always_tok_s=1.0 / always,
    )


def _int4_line(profile: Any, runs: bool, other: dict[str, float]) -> str:
    """What the other case of torch's int4 GPU kernel gives, and why this profile is planned as it is."""
    capability = profile.device.compute_capability
    figures = f"host-only {other['host-only']:.2f}, hybrid {other['hybrid']:.2f} tok/s, from"
    if runs:
        return (
            f"the 4-bit weights run torch's int4 GPU kernel (compute capability {capability:g} >= "
            f"{INT4_GPU_MIN_CAPABILITY:.1f}; checked against the dequantized matmul at load). Were that check to "
            f"fail, hqq's HQQLinear would dequantize per call, and host jobs would rebuild their experts (not counted): "
            f"{figures}"
        )
    why = (
        f"it needs compute capability {INT4_GPU_MIN_CAPABILITY:.1f}; this GPU's is {capability:g}"
        if capability is not None
        else f"it needs compute capability {INT4_GPU_MIN_CAPABILITY:.1f}; the profile gives no "
        "[device] compute_capability"
    )
    return f"if torch's int4 GPU kernel ran the 4-bit weights ({why}; hqq dequantizes per call): {figures}"
