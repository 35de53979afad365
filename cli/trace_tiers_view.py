"""`offload trace replay --host-memory|--host-experts`: a two-level replay (device slots over a host tier
over the disk), as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from cli import options

if TYPE_CHECKING:
    from offload.trace.format import Trace
    from offload.trace.replay_tiers import TwoLevelResult


def replay_two_levels(
    trace: Trace,
    trace_path: Path,
    policies: list[str],
    ks: list[int],
    host_memory: float | None,
    host_experts: int | None,
    host_policy: str | None,
    host_counts: str,
    expert_bytes: int | None,
    as_json: bool,
) -> None:
    """Replay every K and device policy over each host policy, Belady's included, and print the rows."""
    from offload.trace.replay_tiers import HOST_COUNTS, host_slots_for_budget, replay_two_level_table

    if host_memory is not None and host_experts is not None:
        raise typer.BadParameter("give --host-memory or --host-experts, not both", param_hint="--host-memory")
    host_policies = _parse_host_policies(host_policy)
    if host_counts not in HOST_COUNTS:
        raise typer.BadParameter(
            f"{host_counts!r}: use {' or '.join(HOST_COUNTS)}", param_hint="--host-counts"
        )
    if host_memory is not None:
        slots = host_slots_for_budget(trace, host_memory, expert_bytes)
    elif host_experts is not None:
        if host_experts > trace.num_experts:
            raise typer.BadParameter(
                f"{host_experts} is more than the trace's {trace.num_experts} experts per layer",
                param_hint="--host-experts",
            )
        slots = host_experts * trace.num_layers
    else:
        raise typer.BadParameter(
            "a two-level replay needs the host tier's size: --host-memory GiB or --host-experts N",
            param_hint="--host-policy",
        )
    rows = replay_two_level_table(trace, policies, ks, host_policies, slots, expert_bytes, host_counts)
    if as_json:
        summary = {
            **replay_summary(trace, trace_path, expert_bytes),
            "host_memory_gib": host_memory,
            "host_counts": host_counts,
            "rows": [row.as_dict() for row in rows],
        }
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_table(trace, trace_path, rows)


def _parse_host_policies(text: str | None) -> list[str]:
    """The host tier's policies in order, with Belady last: the reference every row is compared with."""
    from offload.errors import TraceError
    from offload.trace.replay_tiers import HOST_POLICIES, parse_host_policy

    if text is None:
        return list(HOST_POLICIES)
    policies = options.comma_items(text, "--host-policy")
    for policy in policies:
        try:
            parse_host_policy(policy)
        except TraceError:
            raise typer.BadParameter(
                f"{policy!r} is not a host-tier policy: use {', '.join(HOST_POLICIES)} or lrfu:D (0 < D < 1)",
                param_hint="--host-policy",
            ) from None
    return [p for p in dict.fromkeys(policies) if p != "belady"] + ["belady"]


def _print_table(trace: Trace, trace_path: Path, rows: list[TwoLevelResult]) -> None:
    console = Console(emoji=False)
    slots = rows[0].host_slots
    title = escape(
        f"{trace.model or trace_path.name}: {trace.steps} steps, {trace.tokens} tokens, {trace.num_layers} "
        f"layers x {trace.num_experts} experts (top-{trace.top_k}); host tier of {slots} experts, any layer "
        f"({slots / trace.num_layers:g} per layer)"
    )
    with_bytes = rows[0].disk_bytes is not None
    columns = ["K", Column("device", no_wrap=True), "dev hit"]
    if with_bytes:
        columns.append(Column("link MiB", justify="right"))
    columns += [Column("host", no_wrap=True), "host hit", Column("reads", justify="right")]
    if with_bytes:
        columns.append(Column("disk MiB", justify="right"))
    columns.append(Column("vs Belady", justify="right", no_wrap=True))
    table = Table(*columns, title=title)
    optimum = {
        (r.experts_per_layer, r.device_policy): r.host_misses for r in rows if r.host_policy == "belady"
    }
    previous = None
    for row in rows:
        key = (row.experts_per_layer, row.device_policy)
        if previous is not None and key != previous:
            table.add_section()
        previous = key
        cells = [str(row.experts_per_layer), row.device_policy or "none", _percent(row.device_hit_rate)]
        if with_bytes:
            cells.append(_mib(row.link_bytes_per_token))
        cells += [row.host_policy, _percent(row.host_hit_rate), str(row.host_misses)]
        if with_bytes:
            cells.append(_mib(row.disk_bytes_per_token))
        cells.append(_versus(row.host_misses, optimum[key], row.host_policy == "belady"))
        table.add_row(*cells)
    console.print(table)
    console.print(
        "MiB are per token. The host tier sees only the device's loads (K = 0: every access); each of its misses is one expert "
        "read from disk.\nBelady knows the future: the fewest disk reads possible for that device stream."
    )
    if not with_bytes:
        console.print("The trace does not record an expert's size: give --expert-bytes for bytes per token.")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def _versus(reads: int, optimum: int, is_optimum: bool) -> str:
    if is_optimum:
        return "optimum"
    if optimum == 0:
        return "=" if reads == 0 else "+inf"
    return f"{reads / optimum:.2f}x"


def replay_summary(trace: Trace, trace_path: Path, expert_bytes: int | None) -> dict[str, Any]:
    """What every replay's JSON starts with: the trace, its header and its size."""
    return {
        "trace": str(trace_path),
        **{key: value for key, value in trace.header().items() if key not in ("format", "version")},
        "steps": trace.steps,
        "tokens": trace.tokens,
        "expert_bytes": expert_bytes or trace.header()["expert_bytes"],
    }
