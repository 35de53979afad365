"""The paper's ablation (arXiv 2312.17238, Table 2) as a markdown table, from `offload bench --ablate`.

One process, one emulated link sized so that one expert copy costs --copy-ratio times one layer's
measured decode compute, and (--host-ratio) an emulated host on which one expert takes that many times the
device's measured time for it; K = half the experts; rows measured interleaved; medians of --runs runs.

    python benchmarks/ablation.py --model offload/demo --copy-ratio 5 --host-ratio 10 --runs 5 --json /tmp/ablation.json
    python benchmarks/ablation.py --model offload/demo --copy-ratio 5 --runs 5 --cache-policy lru   # the paper's
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.stats_view import percent

TARGETS = {  # row -> the least full/row decode ratio asked for (issue 15; resident: the least full/resident)
    "copy-only": ("full / copy-only", 2.0),
    "resident": ("full / all-resident", 0.4),
}


def markdown(report: dict[str, Any]) -> str:
    """The rows with their ratios, the targets, the Belady comparison and the setup, as markdown."""
    rows = {row["name"]: row for row in report["rows"]}
    full = rows["full"]["decode_tokens_per_second"]
    lines = [
        "| row | K | prefetch | decode tok/s | full / row | prefill tok/s | TTFT ms | hit rate | recall | MB moved/token | wait ms/token | on host/token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        decode = row["decode"]
        lines.append(
            f"| {row['name']} | {'all' if row['experts_per_layer'] is None else row['experts_per_layer']} | {row['prefetch']} "
            f"| {row['decode_tokens_per_second']:.1f} | {full / row['decode_tokens_per_second']:.2f} "
            f"| {row['prefill_tokens_per_second']:.1f} | {row['ttft_seconds'] * 1e3:.1f} "
            f"| {percent(decode['hit_rate'])} | {percent(decode['prefetch_recall'])} "
            f"| {(decode['bytes_moved_per_token'] or 0) / 1e6:.2f} | {(decode['wait_seconds_per_token'] or 0) * 1e3:.2f} "
            f"| {decode.get('host_computes_per_token') or 0:.2f} |"
        )
    lines += ["", "| target | measured | asked |", "|---|---|---|"]
    for name, (label, least) in TARGETS.items():
        if name in rows:
            ratio = full / rows[name]["decode_tokens_per_second"]
            lines.append(f"| {label} | {ratio:.2f} | ≥ {least} {'✓' if ratio >= least else '✗'} |")
    check = report.get("policy_check")
    if check is not None:
        decode = check["decode"]
        for policy in ("lru", "lrfu"):
            ratio = decode[f"{policy}_prefetch_over_belady"]
            lines.append(
                f"| bytes {policy.upper()}+prefetch / Belady (decode steps, replayed) | {ratio:.2f} "
                f"| ≤ 1.2 {'✓' if ratio <= 1.2 else '✗'} |"
            )
            lines.append(
                f"| bytes {policy.upper()} / Belady (decode steps, replayed) | {decode[f'{policy}_over_belady']:.2f} "
                "| (no prefetch) |"
            )
        lines.append(
            f"| bytes measured ({check['cache_policy'].upper()}+prefetch) / Belady (whole run, prefill included) "
            f"| {check['whole']['measured_over_belady']:.2f} | |"
        )
    link, machine, host = report["link"], report["machine"], report.get("host")
    lines += [
        "",
        f"Setup: {report['model']}, {report['dtype']}, experts {report['quant']}, {report['device']}, "
        f"cache policy {report['cache_policy'].upper()}; "
        f"prompt {report['prompt']['tokens']} tokens ({report['prompt']['source']}), {report['new_tokens']} new tokens, "
        f"median of {report['runs']} interleaved runs after a warm-up. "
        f"Link {link['spec']}: one expert ({link['expert_bytes'] / 2**20:.2f} MiB) in "
        f"{link['expert_copy_seconds'] * 1e3:.2f} ms"
        + (
            f" = {link['copy_ratio']:g} x one layer's decode compute ({link['layer_seconds'] * 1e3:.2f} ms, "
            "measured by a calibration run)"
            if link["layer_seconds"]
            else ""
        )
        + (
            f", {link['effective_copy_ratio']:.2f} x the resident row's own layer time in the measured runs"
            if link.get("effective_copy_ratio")
            else ""
        )
        + (
            f". Host: {host['host']}, one expert at 1 token {host['host_expert_seconds']['1'] * 1e3:.3f} ms against "
            f"{host['device_expert_seconds']['1'] * 1e3:.3f} ms on the device; a miss goes to the device from "
            f"{host['prefill_threshold_tokens']} tokens"
            if host
            else ""
        )
        + f". {machine['torch_threads']} torch threads, load average {machine['load_average_start']} -> "
        f"{machine['load_average_end']}; every row gave the same tokens.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offload/demo")
    parser.add_argument("--copy-ratio", type=float, default=5.0)
    parser.add_argument("--host-ratio", type=float, default=10.0, help="0: no emulated host")
    parser.add_argument("--experts-per-layer", "-k", default=None, help="default: half the experts")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--cache-policy", default=None, help="lrfu or lru (default: the profile's, lrfu)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--rows", default=None, help="comma list of rows (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from offload.bench.ablation import VARIANTS
    from offload.bench.run import run_bench
    from offload.settings.flags import LoadFlags

    report = run_bench(
        args.model,
        LoadFlags(
            dtype=args.dtype,
            experts_per_layer=args.experts_per_layer,
            prefetch=args.prefetch,
            cache_policy=args.cache_policy,
            threads=args.threads,
            host_ratio=args.host_ratio or None,
        ),
        copy_ratio=args.copy_ratio,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        runs=args.runs,
        ablate=True,
        variants=args.rows.split(",") if args.rows else VARIANTS,
        progress=lambda line: print(line, file=sys.stderr),
    ).as_dict()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
