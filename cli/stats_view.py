"""Rendering the engine's counters as rich tables (/stats in chat)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def stats_table(session: Any) -> Table:
    """Per-layer cache figures plus the totals, for a ChatSession."""
    import torch

    engine = session.engine
    stats = engine.cache_stats()
    caption = f"{torch.get_num_threads()} CPU threads (--threads)"
    timings = session.last_timings
    if timings is not None:
        caption = (
            f"last reply: {timings.decode_tokens_per_second:.1f} tok/s decode, "
            f"{timings.prefill_tokens_per_second:.1f} tok/s prompt, TTFT {timings.ttft_seconds:.2f} s; "
            + caption
        )
    table = Table(title="offload stats", show_edge=False, caption=caption)
    if stats is None:
        table.add_column("experts")
        table.add_row("all resident on the device (no cache, nothing moved)")
        return table
    table.add_column("layer", justify="right")
    table.add_column("hit rate", justify="right")
    table.add_column("prefetch recall", justify="right")
    table.add_column("MB moved", justify="right")
    table.add_column("on host", justify="right")  # misses computed on the host CPU (hybrid execution)
    tier = engine.host_tier_stats()  # None unless experts are read from disk (--host-memory)
    if tier is not None:
        table.add_column("host-tier hit", justify="right")
        table.add_column("disk reads", justify="right")  # demand misses and prefetch reads
        table.add_column("MB read from disk", justify="right")
        table.caption += (
            f"; host tier {tier['bytes_held'] / 2**20:.1f} MiB, {tier['slots']} of {tier['experts']} experts, "
            f"{tier['disk_wait_seconds']:.2f} s waited on disk"
        )
    tier_layers = tier["layers"] if tier is not None else []
    for layer, row in enumerate(stats.get("layers", [])):
        table.add_row(str(layer), *_figures(row), *_tier_figures(tier_layers[layer] if tier_layers else None))
    table.add_section()
    table.add_row("all", *_figures(stats), *_tier_figures(tier))
    return table


def _tier_figures(row: dict[str, Any] | None) -> tuple[str, ...]:
    if row is None:
        return ()
    return percent(row.get("hit_rate")), str(row["reads"]), f"{row['disk_bytes_read'] / 1e6:.1f}"


def _figures(row: dict[str, Any]) -> tuple[str, str, str, str]:
    return (
        percent(row.get("hit_rate")),
        percent(row.get("prefetch_recall")),
        f"{(row.get('bytes_moved') or 0) / 1e6:.1f}",
        str(row.get("host_computes") or 0),
    )


def percent(ratio: float | None) -> str:
    """A ratio as a percentage, or a dash when there was nothing to measure."""
    return "–" if ratio is None else f"{ratio:.0%}"
