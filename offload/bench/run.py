"""`offload bench`: prefill and decode speed, TTFT, cache figures and memory per tier, and the ablation.

``run_bench`` loads the model once and measures one row per ExpertSource (``offload.bench.ablation``):
the configuration asked for, or with ``ablate`` the rows of ``offload.bench.ablation`` (resident, full,
copy-only, no-prefetch, no-cache, naive, host-experts) over one host store, one link and one host. Every row decodes greedily the same prompt for exactly
``new_tokens`` tokens (EOS does not stop it): one warm-up run, then ``runs`` measured ones, interleaved
across rows so that a change in machine load slows every row alike (row by row, each from an empty tier, when
they share a host tier: ``offload.bench.measure``); speeds are medians over runs.
Every row must give the same tokens as the resident one, or the bench fails (``BenchError``).

``copy_ratio`` sets an emulated link's bandwidth from a measurement: the resident row's decode time per
token divided by the layers is one layer's compute (attention, the MoE block with its two experts, and
a layer's share of embedding, lm_head and sampling); one copy of the largest expert then takes
``copy_ratio`` times that.

``--host-ratio`` emulates the host the same way (``offload.experts.host.EmulatedHost``): a host expert takes
that many times the device's time for the same expert, measured on the loaded model before the rows run.

The report and its JSON schema: ``offload.bench.report``.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from offload import f32_kernel
from offload.bench.ablation import DESCRIPTIONS, VARIANTS, build_source
from offload.bench.measure import RowResult, measure_rows
from offload.bench.policy_check import policy_check
from offload.bench.report import BenchError, BenchReport, LinkInfo
from offload.errors import ContextError
from offload.experts.cost_model import CostModel
from offload.experts.link import EmulatedLink, parse_link
from offload.experts.offloaded import HostPath
from offload.experts.source import ExpertSource
from offload.hybrid import build_host_path
from offload.quant import vnni_kernel
from offload.quant.codec import codec_for
from offload.settings.flags import LoadFlags

Progress = Callable[[str], None]  # receives one line of progress
TIER_SETUP = (
    "budget_bytes",
    "bytes_held",
    "slots",
    "experts",
    "policy",
    "disk",
)  # the report's host_tier block
TIER_ROW = "every expert computed on the host from the host tier (--host-memory)"


def run_bench(
    model: str | Path | None = None,
    flags: LoadFlags | None = None,
    *,
    copy_ratio: float | None = None,
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    runs: int = 3,
    ablate: bool = False,
    variants: Sequence[str] = VARIANTS,
    prompt_ids: list[int] | None = None,
    progress: Progress | None = None,
) -> BenchReport:
    """Measure ``model`` (default: the demo model) as configured by the profile and ``flags``.

    ``ablate`` measures the rows of ``offload.bench.ablation`` named in ``variants`` (default: all five) at
    K = ``flags.experts_per_layer`` (default: half the experts when the settings keep them all resident).
    ``copy_ratio`` gives an emulated link whose expert copy costs that many layers of compute (instead
    of ``flags.link``). ``prompt_ids`` replaces the built-in prompt. torch's intra-op threads are the
    settings' (``flags.threads``, else the default of ``offload.settings.threads``) while the bench runs.
    ``progress`` receives a line before each step.
    """
    from offload.bench.measure import measure_rows
    from offload.engine import resolve_model

    flags = flags or LoadFlags()
    say = progress or (lambda _: None)
    _check_settings(prompt_tokens, new_tokens, runs, copy_ratio, flags.link, variants)
    resolved = resolve_model(model, flags)
    with torch_threads(resolved.settings.threads):
        load_average_start = _load_average()
        engine, report = _load(resolved, ablate, copy_ratio, prompt_tokens, prompt_ids, new_tokens, runs, say)
        mixtral = engine.model
        if report.experts_per_layer is None:
            # On a CPU with --host-memory, "every expert resident" is every expert computed from the host tier.
            tiered = getattr(mixtral.expert_source, "host_tier", None) is not None
            name, description = ("host-tier", TIER_ROW) if tiered else ("resident", DESCRIPTIONS["resident"])
            say(f"measuring {name}: a warm-up, then {runs} runs")
            row = RowResult(name, description, None, 0)
            report.rows = measure_rows(
                [(row, mixtral.expert_source)], mixtral, report.prompt_ids, new_tokens, runs
            )
        else:
            _measure_offloaded(
                report, mixtral, resolved.settings.offload, copy_ratio, variants if ablate else None, say
            )
        _check_identical(report)
        tier = getattr(mixtral.expert_source, "host_tier", None)
        if tier is not None:
            report.host_tier = {key: value for key, value in tier.summary().items() if key in TIER_SETUP}
        report.machine = _machine(mixtral, load_average_start)
        return report


def _load(
    resolved: Any,
    ablate: bool,
    copy_ratio: float | None,
    prompt_tokens: int,
    prompt_ids: list[int] | None,
    new_tokens: int,
    runs: int,
    say: Progress,
) -> tuple[Any, BenchReport]:
    """Load the resolved model through ``Engine.load`` and start the report: (engine, report).

    Offloaded rows share the loader's host store, so the model loads with a one-slot cache that the
    rows' own sources replace at once.
    """
    from offload.bench.prompt import bench_prompt
    from offload.engine import Engine

    directory, config, settings = resolved.directory, resolved.config, resolved.settings
    slots = settings.offload.experts_per_layer
    if ablate and slots is None:
        slots = max(1, config.num_local_experts // 2)
    if copy_ratio is not None and slots is None:
        raise BenchError("--copy-ratio sizes the link that moves experts: offload them with -k K or --ablate")
    prompt_source = "given ids"
    if prompt_ids is None:
        prompt_ids, prompt_source = bench_prompt(
            directory, config.vocab_size, prompt_tokens, config.bos_token_id
        )
    if len(prompt_ids) + new_tokens > config.max_position_embeddings:
        raise ContextError(
            f"{len(prompt_ids)} prompt tokens + {new_tokens} new tokens exceed the model's context of "
            f"{config.max_position_embeddings}; lower --prompt-tokens or --new-tokens"
        )
    say(f"loading {directory}")
    # The host tier's guesses (a CPU run from the tier) keep the settings' prefetch; offloaded rows set their own.
    loading = resolved.with_offload(
        experts_per_layer=None if slots is None else 1,
        prefetch=settings.offload.prefetch if slots is None else 0,
        link="local",
        host_compute="never",
    )
    engine = Engine.load(loading, tokenizer=False)
    mixtral = engine.model
    report = BenchReport(
        model=str(directory),
        device=str(mixtral.device),
        dtype=str(mixtral.dtype).removeprefix("torch."),
        quant=_describe_quant(mixtral),
        prompt_ids=list(prompt_ids),
        prompt_source=prompt_source,
        new_tokens=new_tokens,
        runs=runs,
        experts_per_layer=slots,
        prefetch=settings.offload.prefetch,
        cache_policy=settings.offload.cache_policy,
        num_layers=config.num_hidden_layers,
        link=LinkInfo("none (every expert resident)" if slots is None else settings.offload.link),
    )
    return engine, report


def _measure_offloaded(
    report: BenchReport,
    mixtral: Any,
    offload: Any,
    copy_ratio: float | None,
    variants: Sequence[str] | None,
    say: Progress,
) -> None:
    """Fill ``report`` with the offloaded rows: the ablation's ``variants``, or (None) one "offloaded" row.

    With ``copy_ratio``, a resident row is measured first and sizes the emulated link.
    """
    store = mixtral.expert_source.cache.store
    slots, prefetch, policy = report.experts_per_layer, offload.prefetch, offload.cache_policy
    prompt_ids, new_tokens, runs = report.prompt_ids, report.new_tokens, report.runs
    expert_bytes = max(store.layout(layer).nbytes for layer in range(store.num_layers))
    rows: list[tuple[RowResult, ExpertSource]] = []
    if (variants is not None and "resident" in variants) or copy_ratio is not None:
        resident = build_source("resident", mixtral, store, None, slots, 0)
        rows.append((RowResult("resident", DESCRIPTIONS["resident"], None, 0), resident))
    if copy_ratio is not None:
        say(f"calibrating: {runs} runs of resident, to time one layer's compute")
        calibration = RowResult("calibration", "", None, 0)
        measure_rows([(calibration, resident)], mixtral, prompt_ids, new_tokens, runs)
        layer_seconds = 1 / calibration.median("decode_tokens_per_second") / mixtral.config.num_hidden_layers
        gbps = expert_bytes / (copy_ratio * layer_seconds) / 1e9
        link = EmulatedLink(gbps)
        report.link = LinkInfo(f"emulated:{gbps:.6g}:0", gbps, 0.0, copy_ratio, layer_seconds, expert_bytes)
    else:
        link = parse_link(offload.link)
        emulated = isinstance(link, EmulatedLink)
        gbps, latency = (link.gbps, link.latency_us) if emulated else (None, None)
        report.link = LinkInfo(offload.link, gbps, latency, None, None, expert_bytes)
    with link:
        names = ("offloaded",) if variants is None else [v for v in VARIANTS[1:] if v in variants]
        say("probing the link, the device and the host for the cost model")
        host, host_only = _host_paths(mixtral, store, link, offload, names)
        report.host = _host_info(host or host_only, offload)
        for name in names:
            variant = "full" if name == "offloaded" else name
            row_prefetch = prefetch if variant in ("full", "copy-only") else 0
            description = (
                DESCRIPTIONS[variant].format(policy=policy.upper())
                if variants
                else f"offloaded, {policy.upper()} cache, prefetch {row_prefetch}"
                + (", misses on the host when cheaper" if host is not None else "")
            )
            row_slots = {"naive": 1, "host-experts": 0}.get(name, slots)
            row = RowResult(name, description, row_slots, row_prefetch)
            row_host = host_only if variant == "host-experts" else host
            rows.append((row, build_source(variant, mixtral, store, link, slots, prefetch, policy, row_host)))
        say(
            f"measuring {', '.join(row.name for row, _ in rows)}: a warm-up each, then {runs} interleaved runs"
        )
        report.rows = measure_rows(rows, mixtral, prompt_ids, new_tokens, runs)
        del rows  # frees every row's slots before the policy check makes its own
        if variants is not None and {"full", "copy-only"} & set(variants) and isinstance(slots, int):
            # The cache policy's own test: the copy-only engine, where every miss is a load.
            say("recording one cold run of copy-only for the Belady comparison")
            source = build_source("copy-only", mixtral, store, link, slots, prefetch, policy)
            report.policy_check = policy_check(mixtral, source, prompt_ids, new_tokens, slots, policy)


def _host_paths(
    mixtral: Any, store: Any, link: Any, offload: Any, names: Sequence[str]
) -> tuple[HostPath | None, HostPath | None]:
    """The host path of the full (or offloaded) row as the settings ask (None: every miss copied), and
    the host of the host-experts row (that same one, or one made for it; None when no row needs it).
    """
    scheme, config = mixtral.quant_scheme, mixtral.config
    codecs = [codec_for(scheme.expert_spec(layer)) for layer in range(config.num_hidden_layers)]

    def path(mode: str) -> HostPath | None:
        return build_host_path(
            store,
            codecs,
            link,
            dtype=mixtral.dtype,
            device=mixtral.device,
            hidden_size=config.hidden_size,
            mode=mode,
            host_ratio=offload.host_ratio,
            overrides=offload.host_costs,
        )

    wants_host = {"full", "offloaded"} & set(names)
    host = path(offload.host_compute) if wants_host else None
    host_only = (host or path("always")) if "host-experts" in names else None
    return host, host_only


def _host_info(path: HostPath | None, offload: Any) -> dict[str, Any] | None:
    """The report's ``host`` block: the cost model's measured inputs and the prefill threshold."""
    if path is None:
        return None
    inputs = path.model.inputs
    return {
        "host_compute": offload.host_compute,
        "host_ratio": offload.host_ratio,
        "host": path.host.describe(),
        "link_gbps": inputs.link_gbps,
        "copy_seconds": inputs.copy_seconds(0),
        "host_expert_seconds": {str(t): inputs.host.at(t) for t, _ in inputs.device.points},
        "device_expert_seconds": {str(t): s for t, s in inputs.device.points},
        "prefill_threshold_tokens": CostModel(inputs, "auto").prefill_threshold(),
    }


def _machine(mixtral: Any, load_average_start: list[float] | None) -> dict[str, Any]:
    on_cuda = mixtral.device.type == "cuda"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average_start,
        "load_average_end": _load_average(),
        "peak_rss_bytes": peak_rss_bytes(),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(mixtral.device) if on_cuda else None,
        # Which kernel ran the CPU's 4-bit matrices: the figures depend on it (``OFFLOAD_CPU_KERNEL``).
        "cpu_int4_kernel": "vnni" if vnni_kernel.active() else "torch",
        "cpu_f32_kernel": "ours" if f32_kernel.active() else "torch",
    }


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (None: unchanged) inside the block, restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_settings(
    prompt_tokens: int,
    new_tokens: int,
    runs: int,
    copy_ratio: float | None,
    link: str | None,
    variants: Sequence[str],
) -> None:
    if prompt_tokens < 1:
        raise BenchError(f"--prompt-tokens must be >= 1, got {prompt_tokens}")
    if new_tokens < 2:
        raise BenchError(
            f"--new-tokens must be >= 2 (the first token comes from the prefill), got {new_tokens}"
        )
    if runs < 1:
        raise BenchError(f"--runs must be >= 1, got {runs}")
    if copy_ratio is not None and not copy_ratio > 0:
        raise BenchError(f"--copy-ratio must be > 0, got {copy_ratio}")
    if copy_ratio is not None and link is not None:
        raise BenchError(
            "give either --copy-ratio (an emulated link sized from the model) or --link, not both"
        )
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown or not variants:
        raise BenchError(f"unknown ablation rows {unknown}; choose from {', '.join(VARIANTS)}")


def _check_identical(report: BenchReport) -> None:
    """Offloading never changes the output: every row must give the first row's tokens."""
    reference = report.rows[0]
    others = [(row.name, row.tokens) for row in report.rows[1:]]
    if report.policy_check is not None:
        others.append(("policy check", report.policy_check["tokens"]))
    for name, tokens in others:
        if tokens != reference.tokens:
            at = next(
                (i for i, (a, b) in enumerate(zip(tokens, reference.tokens, strict=False)) if a != b), 0
            )
            raise BenchError(
                f"row {name!r} generated other tokens than {reference.name!r} (first at position {at}): "
                "offloading changed the output, which is a bug"
            )


def _describe_quant(mixtral: Any) -> str:
    scheme = mixtral.quant_scheme
    specs = [str(scheme.expert_spec(layer)) for layer in range(mixtral.config.num_hidden_layers)]
    return specs[0] if len(set(specs)) == 1 else ",".join(specs)


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
