"""The plan's host and disk tiers: how many experts the host budget holds, what the disk reads per token,
the decode time that adds, and the process's predicted peak RSS.

With ``[host] memory_gib`` (or ``--host-memory``) the host tier is one pool of S = budget // slot bytes
slots (a slot: the largest layer's expert), shared by every layer, as ``offload.experts.host_tier`` holds
it; at most L · E, and at least top_k (one token's experts of one layer) or the plan is refused. The other
L · E - S experts stay in the converted checkpoint on disk. Without a budget every expert is in RAM and
nothing is read from disk after loading.

Disk reads, per token, summed over layers l (E experts, top_k chosen, K_l device slots), with the locality
model of ``offload.settings.plan_speed`` for both levels and H = S / L, the pool's share per layer:
    hit(n)      = p + LOCALITY_BONUS · p · (1 - p),  p = min(1, n / E)
    reads_l     = top_k · (1 - hit(K_l)) · (1 - hit(H))   the device's misses, times the tier's miss rate
    reads_l     = top_k · (1 - hit(H))                     where no device slot sits in front of the tier:
                  a profile with every expert "resident" and a host budget computes the experts on the host,
                  straight from the tier (``HostOnlyExperts``), and so does host-only execution
    disk_l      = reads_l · expert bytes_l / disk GB/s
    t(token)   += Σ disk_l
The tier's hit rate on the device's misses is hit(H), as if it did not depend on the device's cache. The
tier sees only the device's misses; replays of the demo model's traces with half the experts in the tier
(docs/BENCHMARKS.md, "Disk tier: plan and replay") measured 67% (no slots), 55% (K = 2) and 39% (K = 4)
under the engine's LRFU, where hit(4 of 8) = 57.5%; a tier that held the device's experts (inclusion)
would hit (hit(H) - hit(K)) / (1 - hit(K)) of them: 39% at K = 2, nothing at all once H <= K.

Reads overlap nothing. A miss is known only once its layer's router has run, and its expert is needed in
that same layer: the read, then the copy over the link (or the host kernel), form one chain, so the read's
time is added in full to that of the miss that needs it. The engine also reads the next layer's guesses
ahead; the plan counts none of that, so with a budget the predicted tok/s is a floor on this account.

Where the host computes read experts with the CPU int4 kernel (4-bit experts: every read when the experts run
on the host from the tier, on a CPU device or with host-only execution; a hybrid run's misses when the cost model
sends them to the host), the tier's reader thread converts each read in its slot to that kernel's layout
(``offload.experts.tier_form``; host-only: ``offload.experts.in_place``), after the read and before the next
read, so serially with both (a hybrid run's tier converts every read where the GPU runs torch's int4 kernel,
those it copies to the device too: ``plan_policy.hybrid_builds``):
    build_l     = reads_l · one expert's build (``plan_speed.host_build_seconds``: 71.5 ms for a Mixtral expert at
                  one thread; about half of it spreads over the run's threads, [host] cores)
    t(token)   += Σ build_l            only for the policies that compute the read experts on the host
A copy to the device needs no host build (on CUDA the device repacks the copied expert: cheap), so copy-only,
and hybrid where its misses go to the device and its tier keeps hqq's layout (no int4 GPU kernel), add the
reads alone; so do specs whose host expert keeps its stored bytes (int8, dense) or dequantizes at every call
(3-bit: priced per call in ``plan_speed``).

Predicted peak RSS of the process (host memory), the sum of:
- the host tier: S slots of the largest layer's expert bytes, the one arena the tier allocates (the page
  cache holds what the disk reads, but it is not the process's RSS); without a budget, every expert;
- on a CPU device, the device tier too, since it is the same RAM: dense weights, expert slots, the KV
  cache and the workspace (``offload.settings.plan``);
- the runtime: Python, torch, the tokenizer and offload's own modules before any weight is read,
  RUNTIME_RSS_BYTES (222 MiB measured in docs/BENCHMARKS.md, "Host RAM holds one copy of each expert";
  231 MiB here for ``import torch, offload.engine``);
- on CUDA, the CUDA runtime's host memory: CUDA_HOST_RSS_BYTES, an assumption (not measured here);
- load staging: the checkpoint's dense tensors are read one at a time with plain reads into buffers of
  offload's own, so the largest tensor (the embedding, the lm_head or one expert) is held twice for a moment.
  The same term covers, later, the tier reader's scratch (one expert's stored bytes, where it converts or
  builds its reads): no larger, and never at the same time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from offload.errors import ProfileError

GIB = 1024**3
MIB = 1024**2
# Python + torch + tokenizer + offload before any weight: 222 MiB in docs/BENCHMARKS.md, 231 MiB measured
# here for a fresh `import torch, offload.engine, safetensors, tokenizers` (Maximum resident set size).
RUNTIME_RSS_BYTES = 240 * MIB
# The CUDA context, cuBLAS and the driver's host-side allocations and mapped libraries. An assumption: this
# machine has no GPU to measure it on.
CUDA_HOST_RSS_BYTES = 1 * GIB
MAX_HOST_MEMORY_GIB = 1024**2  # a PiB: far beyond any machine, small enough that bytes stay exact integers
MAX_DISK_GBPS = 1e4  # 10 TB/s: far beyond any disk


@dataclass(frozen=True)
class HostTier:
    """The host tier's size, the disk behind it, and what the disk reads per token."""

    memory_gib: float | None  # the budget; None: every expert in RAM
    budget_bytes: int | None
    disk_gbps: float
    slots: int  # experts the tier holds, of any layer (every expert without a budget)
    experts: int  # L · E
    bytes: int  # what the tier holds: slots x the largest layer's expert bytes (every expert's bytes without a budget)
    disk_experts: int  # L · E - slots: experts left on disk at any moment
    disk_bytes: int  # their bytes (exact when every layer's experts are the same size)
    hit_rate: float | None  # hits over the device misses that reach the tier; None when none reach it
    disk_reads_per_token: float  # expected experts read from disk per token, summed over layers
    disk_bytes_per_token: int
    disk_seconds_per_token: float  # disk_bytes_per_token / disk GB/s, added to the token's time
    serves_device_slots: bool  # False: the experts are computed straight from the tier (no slot in front)
    # Σ reads · one expert's build for the host's int4 kernel: added only where the host computes the reads
    build_seconds_per_token: float = 0.0
    expert_build_seconds: float = 0.0  # one expert's build (the largest layer's); 0: the spec needs none

    def miss_seconds(self, on_host: bool) -> float:
        """A token's time in the tier's misses: the reads, and where the host computes the read experts
        (``on_host``), their builds too, serial with the reads on the tier's reader thread."""
        return self.disk_seconds_per_token + (self.build_seconds_per_token if on_host else 0.0)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PeakRss:
    """The process's predicted peak resident set, part by part (bytes)."""

    host_tier: int
    device_tier_in_ram: int  # a CPU device's dense weights, slots, KV cache and workspace; 0 on CUDA
    runtime: int
    cuda_runtime: int
    load_staging: int

    @property
    def total(self) -> int:
        return self.host_tier + self.device_tier_in_ram + self.runtime + self.cuda_runtime + self.load_staging

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def hit_rate(slots: int, experts: int, locality_bonus: float) -> float:
    """The chance that a chosen expert sits in one of ``slots``: chance, plus the locality of routing."""
    p = min(1.0, slots / experts)
    return p + locality_bonus * p * (1 - p)


def host_slots(budget: int, expert_bytes: Sequence[int], experts: int, top_k: int, where: str) -> int:
    """The experts a budget of ``budget`` bytes holds, of any layer (slots of the largest layer's size).

    Raises ProfileError naming ``where`` when they are fewer than ``top_k``: one token's experts of a layer.
    """
    slot = max(expert_bytes)
    slots = min(budget // slot, experts * len(expert_bytes))
    if slots < top_k:
        raise ProfileError(
            f"{where}: holds {slots} experts of {_size(slot)}, and one layer's step needs {top_k}; "
            f"allowed is {top_k * slot / GIB:.4g} GiB or more"
        )
    return slots


def plan_host_tier(
    *,
    memory_gib: float | None,
    disk_gbps: float,
    where: str,
    device_slots: Sequence[int] | None,
    expert_bytes: Sequence[int],
    experts: int,
    top_k: int,
    locality_bonus: float,
    build_seconds: Sequence[float] | None = None,
) -> HostTier:
    """The host tier under a budget of ``memory_gib`` (None: every expert in RAM).

    ``device_slots`` are K_l in front of the tier, or None when the experts are computed from the tier.
    ``build_seconds``: one expert's build for the host's kernel, per layer (None: no build).
    """
    layers, total = len(expert_bytes), experts * len(expert_bytes)
    every_expert = experts * sum(expert_bytes)
    if memory_gib is None:
        budget, slots, held = None, total, every_expert
    else:
        budget = int(memory_gib * GIB)
        slots = host_slots(budget, expert_bytes, experts, top_k, where)
        held = slots * max(expert_bytes)
    host_hit = hit_rate(slots / layers, experts, locality_bonus)
    front = [0] * layers if device_slots is None else list(device_slots)
    builds = [0.0] * layers if build_seconds is None else list(build_seconds)
    reads = device_misses = read_bytes = build = 0.0
    for k, size, one_build in zip(front, expert_bytes, builds, strict=True):
        device_hit = hit_rate(k, experts, locality_bonus)
        layer_reads = top_k * (1 - device_hit) * (1 - host_hit)
        reads += layer_reads
        device_misses += top_k * (1 - device_hit)
        read_bytes += layer_reads * size
        build += layer_reads * one_build
    return HostTier(
        memory_gib=memory_gib,
        budget_bytes=budget,
        disk_gbps=disk_gbps,
        slots=slots,
        experts=total,
        bytes=held,
        disk_experts=total - slots,
        disk_bytes=round(every_expert * (total - slots) / total),
        hit_rate=1 - reads / device_misses if device_misses > 1e-12 else None,
        disk_reads_per_token=reads,
        disk_bytes_per_token=round(read_bytes),
        disk_seconds_per_token=read_bytes / (disk_gbps * 1e9),
        serves_device_slots=device_slots is not None,
        build_seconds_per_token=build,
        expert_build_seconds=max(builds),
    )


def tier_parts(
    tiers: dict[bool, HostTier], policy: str, *, from_tier: bool, hybrid_builds: bool
) -> tuple[float, float]:
    """(disk reads, host builds): ``policy``'s seconds a token in tier misses, from ``tiers`` (keyed by whether
    device slots sit in front).

    The read experts are built for the host when the experts run from the tier, under host-only and "always"
    (every miss on the host), and under hybrid where its tier converts them (``hybrid_builds``:
    ``plan_policy.hybrid_builds``).
    """
    on_host = from_tier or policy in ("host-only", "always") or (policy == "hybrid" and hybrid_builds)
    tier = tiers[policy != "host-only" and not from_tier]
    return tier.disk_seconds_per_token, tier.build_seconds_per_token if on_host else 0.0


def with_tiers(
    tiers: dict[bool, HostTier], tok_s: dict[str, float], from_tier: bool, hybrid_builds: bool
) -> dict[str, float]:
    """Each policy's predicted speed with its time in tier misses added (``tier_parts``)."""
    return {
        policy: with_disk(
            speed, sum(tier_parts(tiers, policy, from_tier=from_tier, hybrid_builds=hybrid_builds))
        )
        for policy, speed in tok_s.items()
    }


def disk_arithmetic(
    tiers: dict[bool, HostTier], tok_s: dict[str, float], from_tier: bool, hybrid_builds: bool
) -> str:
    """The sums from each policy's speed without the tier's misses to ``with_tiers``'s, in milliseconds."""
    sums = []
    for policy, speed in tok_s.items():
        disk, build = tier_parts(tiers, policy, from_tier=from_tier, hybrid_builds=hybrid_builds)
        terms = f"{1e3 / speed:.2f} + {disk * 1e3:.2f} disk" + (
            f" + {build * 1e3:.2f} build" if build else ""
        )
        sums.append(
            f"{policy} {terms} = {(1 / speed + disk + build) * 1e3:.2f} ms -> {with_disk(speed, disk + build):.2f} tok/s"
        )
    return "with the disk reads (and the host's builds of what it reads), overlapping nothing: " + "; ".join(
        sums
    )


def with_disk_line(arithmetic: Sequence[str], line: str) -> tuple[str, ...]:
    """``arithmetic`` with ``line`` (``disk_arithmetic``) right after the policies' sums, the line that starts
    "hybrid:"; the notes and what-ifs after it are said to be without the disk reads."""
    at = next(i for i, text in enumerate(arithmetic) if text.startswith("hybrid:")) + 1
    rest = tuple(arithmetic[at:])
    return (*arithmetic[:at], line + ("; the lines below are without them" if rest else ""), *rest)


def with_disk(tok_s: float, disk_seconds: float) -> float:
    """A token's predicted speed once ``disk_seconds`` of reads are added to its time (they overlap nothing)."""
    return 1.0 / (1.0 / tok_s + disk_seconds)


def peak_rss(*, host_tier_bytes: int, device_bytes: int, device_kind: str, largest_tensor: int) -> PeakRss:
    """The process's predicted peak RSS: see the module docstring for what each part counts."""
    return PeakRss(
        host_tier=host_tier_bytes,
        device_tier_in_ram=device_bytes if device_kind == "cpu" else 0,
        runtime=RUNTIME_RSS_BYTES,
        cuda_runtime=CUDA_HOST_RSS_BYTES if device_kind == "cuda" else 0,
        load_staging=largest_tensor,
    )


def tier_rows(
    tier: HostTier | None, rss: PeakRss | None, experts: int, device_kind: str
) -> list[tuple[str, str, int, str]]:
    """The plan table's host and disk rows: (tier, item, bytes, note)."""
    shared = ", in the same RAM as the device tier" if device_kind == "cpu" else ""
    rows = []
    if tier is None or tier.memory_gib is None:
        note = f"{experts} per layer{shared}" if tier is not None else "none: all resident"
        rows.append(("host", "all experts", 0 if tier is None else tier.bytes, note))
    else:
        of = "the device cache's misses" if tier.serves_device_slots else "the chosen experts"
        hit = "" if tier.hit_rate is None else f", hit rate {tier.hit_rate:.0%} of {of}"
        note = (
            f"{tier.slots} of {tier.experts} experts, any layer; budget {tier.memory_gib:g} GiB{hit}{shared}"
        )
        rows.append(("host", "expert tier", tier.bytes, note))
    if rss is not None:
        if rss.device_tier_in_ram:
            rows.append(("host", "device tier", rss.device_tier_in_ram, "the device is this RAM"))
        runtime = "python, torch, tokenizer" + (" + CUDA runtime (assumed)" if rss.cuda_runtime else "")
        rows.append(("host", "runtime", rss.runtime + rss.cuda_runtime, runtime))
        rows.append(("host", "load staging", rss.load_staging, "the largest tensor, read once more"))
        rows.append(("host", "peak RSS", rss.total, "predicted"))
    if tier is not None and tier.memory_gib is not None:
        note = (
            f"{tier.disk_experts} experts; ~{tier.disk_bytes_per_token / 1e6:.0f} MB read per token "
            f"at {tier.disk_gbps:g} GB/s"
        )
        rows.append(("disk", "experts beyond the budget", tier.disk_bytes, note))
    return rows


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.1f} MiB"
