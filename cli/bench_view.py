"""Rendering a bench report (its JSON dict) as a rich table plus a few lines of context."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from cli.stats_view import percent

MIB = 2**20


def bench_view(report: dict[str, Any]) -> Group:
    """Two tables (speed; the decode steps' cache figures and memory) and a few lines of context.

    Two narrow tables rather than one wide one, so an 80-column terminal shows every figure.
    """
    ablation = any(row["name"] == "full" for row in report["rows"])
    speed = Table(title="offload bench: speed (medians over runs)", show_edge=False)
    cache = Table(title="cache (decode steps) and memory", show_edge=False)
    speed_columns = (
        "row",
        "K",
        "prefetch",
        "decode tok/s",
        "× full" if ablation else None,
        "prefill tok/s",
        "TTFT ms",
    )
    cache_columns = ("row", "hit", "recall", "prec", "MB/tok", "wait ms", "host/tok", "dev MiB", "host MiB")
    for table, titles in ((speed, speed_columns), (cache, cache_columns)):
        for title in titles:
            if title is not None:
                table.add_column(title, justify="left" if title == "row" else "right")
    for row in report["rows"]:
        decode, memory = row["decode"], row["memory"]
        speed.add_row(
            row["name"],
            _slots(row["experts_per_layer"]),
            str(row["prefetch"]) if row["experts_per_layer"] is not None else "–",
            f"{row['decode_tokens_per_second']:.1f}",
            *([_ratio(row["ratio_to_full"])] if ablation else []),
            f"{row['prefill_tokens_per_second']:.1f}",
            f"{row['ttft_seconds'] * 1e3:.1f}",
        )
        cache.add_row(
            row["name"],
            percent(decode["hit_rate"]),
            percent(decode["prefetch_recall"]),
            percent(decode["prefetch_precision"]),
            _per_token(decode["bytes_moved_per_token"], 1e-6, "{:.2f}"),
            _per_token(decode["wait_seconds_per_token"], 1e3, "{:.2f}"),
            _per_token(decode.get("host_computes_per_token"), 1, "{:.2f}"),
            f"{memory['device']['total_bytes'] / MIB:.1f}",
            f"{memory['host']['store_bytes'] / MIB:.1f}",
        )
    tier = _tier_table(report)
    tables = [speed, Text(""), cache, *([Text(""), tier] if tier is not None else [])]
    return Group(*tables, *(Text(line, style="dim") for line in context_lines(report)))


def _tier_table(report: dict[str, Any]) -> Table | None:
    """The host tier's decode figures per row, when experts were read from disk (--host-memory)."""
    setup = report.get("host_tier")
    if setup is None:
        return None
    title = (
        f"host tier (decode steps): {setup['bytes_held'] / MIB:.1f} MiB, {setup['slots']} of {setup['experts']} "
        f"experts, {setup['policy'].upper()}, disk {setup['disk']}"
    )
    table = Table(title=title, show_edge=False)
    for column in ("row", "hit", "reads/tok", "MB read/tok", "disk wait ms/tok"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for row in report["rows"]:
        tier = (row.get("host_tier") or {}).get("decode")
        if tier is None:
            table.add_row(row["name"], "–", "–", "–", "–")
            continue
        tokens = tier["tokens"]
        table.add_row(
            row["name"],
            percent(tier["hit_rate"]),
            _per_token(tier["reads"] / tokens if tokens else None, 1, "{:.2f}"),
            _per_token(tier["disk_bytes_read_per_token"], 1e-6, "{:.2f}"),
            _per_token(tier["disk_wait_seconds_per_token"], 1e3, "{:.2f}"),
        )
    return table


def context_lines(report: dict[str, Any]) -> list[str]:
    """What the table does not say: the setup, the link, the Belady comparison and the machine."""
    link, machine, prompt = report["link"], report["machine"], report["prompt"]
    lines = [
        f"{report['model']} on {report['device']} ({report['dtype']}, experts {report['quant']}); "
        f"prompt {prompt['tokens']} tokens ({prompt['source']}), {report['new_tokens']} new tokens, "
        f"median of {report['runs']} run{'s' if report['runs'] != 1 else ''} after a warm-up"
        + ("; every row gave the same tokens" if len(report["rows"]) > 1 else ""),
        f"link {link['spec']}" + _link_detail(link) + f"; cache policy {report['cache_policy'].upper()}",
    ]
    host = report.get("host")
    if host is not None:
        threshold = host["prefill_threshold_tokens"]
        lines.append(
            f"host: {host['host']}, --host-compute {host['host_compute']}; one expert at 1 token: host "
            f"{host['host_expert_seconds']['1'] * 1e3:.3f} ms, device {host['device_expert_seconds']['1'] * 1e3:.3f} ms, "
            f"copy {host['copy_seconds'] * 1e3:.3f} ms; a miss goes to the device from "
            + (f"{threshold} tokens" if threshold is not None else "no batch size")
        )
    check = report.get("policy_check")
    if check is not None:
        whole, decode = check["whole"], check["decode"]
        lines.append(
            f"bytes moved vs Belady at K={check['experts_per_layer']} (one cold run of copy-only, "
            f"{check['cache_policy'].upper()}): whole run {_ratio(whole['measured_over_belady'])}; decode steps "
            f"LRFU+prefetch {_ratio(decode['lrfu_prefetch_over_belady'])}, LRFU {_ratio(decode['lrfu_over_belady'])}, "
            f"LRU+prefetch {_ratio(decode['lru_prefetch_over_belady'])}, LRU {_ratio(decode['lru_over_belady'])}"
        )
    lines.append(
        f"peak RSS {machine['peak_rss_bytes'] / MIB:.0f} MiB; {machine['torch_threads']} torch threads; "
        + _cpu_kernels(machine)
        + f"load average {machine['load_average_start']} -> {machine['load_average_end']}"
    )
    return lines


def _link_detail(link: dict[str, Any]) -> str:
    parts = []
    if link["gbps"] is not None:
        parts.append(f"{link['gbps']:.4g} GB/s")
    if link["expert_copy_seconds"] is not None:
        parts.append(
            f"one expert ({link['expert_bytes'] / MIB:.2f} MiB) in {link['expert_copy_seconds'] * 1e3:.2f} ms"
        )
    if link["layer_seconds"] is not None:
        parts.append(f"= {link['copy_ratio']:g} × one layer's compute ({link['layer_seconds'] * 1e3:.2f} ms)")
    if link.get("effective_copy_ratio") is not None:
        parts.append(f"{link['effective_copy_ratio']:.2g} × the resident row's layer time")
    return f" ({', '.join(parts)})" if parts else ""


def _slots(value: Any) -> str:
    if value is None:
        return "all"
    return str(value) if isinstance(value, int) else ",".join(map(str, value))


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _per_token(value: float | None, scale: float, form: str) -> str:
    return "–" if value is None else form.format(value * scale)


def _cpu_kernels(machine: dict) -> str:
    """Which of our CPU kernels ran (the figures depend on them), or nothing where only torch's did."""
    ours = [
        name
        for name, key, value in (
            ("int4 vnni", "cpu_int4_kernel", "vnni"),
            ("float32", "cpu_f32_kernel", "ours"),
        )
        if machine.get(key) == value
    ]
    return f"our CPU kernels: {', '.join(ours)} (OFFLOAD_CPU_KERNEL=torch for torch's); " if ours else ""
