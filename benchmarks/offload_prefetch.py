"""Issue 3, measured: prefetching hides transfer time, and host RAM holds one copy of each expert.

1. Decode tok/s with and without prefetch at the same K, under an emulated link on which one expert
   copy takes --copy-ratio times one layer's measured decode compute, on a random model large enough
   that compute is not noise (benchmarks/random_model.py: hidden 1024, FFN 3584, 4 layers, 8 experts).
   Rows resident, full and no-prefetch of `offload bench --ablate`, interleaved, medians of --runs.
2. Peak RSS of a fresh process that loads the model offloaded (K=2), against the model's bytes:
   the host store (every expert once), the dense weights, and the checkpoint on disk.

    python benchmarks/offload_prefetch.py --copy-ratio 4 --runs 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MIB = 2**20


def prefetch_table(report: dict[str, Any]) -> str:
    from cli.stats_view import percent

    rows = {row["name"]: row for row in report["rows"]}
    lines = [
        "| row | K | prefetch | decode tok/s (median) | runs | hit rate | recall | precision | MB moved/token | wait ms/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        decode = row["decode"]
        lines.append(
            f"| {row['name']} | {row['experts_per_layer'] or 'all'} | {row['prefetch']} "
            f"| {row['decode_tokens_per_second']:.2f} | {', '.join(f'{x:.2f}' for x in row['decode_tokens_per_second_runs'])} "
            f"| {percent(decode['hit_rate'])} | {percent(decode['prefetch_recall'])} | {percent(decode['prefetch_precision'])} "
            f"| {(decode['bytes_moved_per_token'] or 0) / 1e6:.1f} | {(decode['wait_seconds_per_token'] or 0) * 1e3:.1f} |"
        )
    full, bare = rows["full"]["decode_tokens_per_second"], rows["no-prefetch"]["decode_tokens_per_second"]
    link, machine = report["link"], report["machine"]
    lines += [
        "",
        f"prefetch / no prefetch: {full / bare:.2f}x decode speed"
        + (
            f"; full / resident: {full / rows['resident']['decode_tokens_per_second']:.2f}"
            if "resident" in rows
            else ""
        )
        + f". Link {link['spec']}: one expert ({link['expert_bytes'] / MIB:.1f} MiB) in {link['expert_copy_seconds'] * 1e3:.1f} ms"
        + (
            f" = {link['copy_ratio']:g} x one layer's compute ({link['layer_seconds'] * 1e3:.2f} ms)"
            if link["layer_seconds"]
            else ""
        )
        + f"; {report['dtype']}, prompt {report['prompt']['tokens']}, {report['new_tokens']} new tokens, "
        f"{machine['torch_threads']} threads, load average {machine['load_average_start']} -> {machine['load_average_end']}.",
    ]
    return "\n".join(lines)


def rss_child(model: str, dtype: str | None) -> None:
    """Run in a fresh process: load the model offloaded and print its memory figures as JSON."""
    import torch

    from offload.loading import OffloadOptions, load_model

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    before, anon_before = status("VmRSS"), status("RssAnon")  # python + torch, before any weight
    mixtral = load_model(model, dtype=dtype, offload=OffloadOptions(experts_per_layer=2, prefetch=0))
    store = mixtral.expert_source.cache.store
    tensors = {id(t): t for t in [*mixtral.parameters(), *mixtral.buffers()]}.values()
    print(
        json.dumps(
            {
                "rss_before_load": before,
                "rss_anon_before_load": anon_before,
                "peak_rss": status("VmHWM"),
                "rss_after_load": status("VmRSS"),
                "rss_anon_after_load": status("RssAnon"),  # private memory: the store, dense weights, slots
                "rss_file_after_load": status("RssFile"),  # mapped file pages (the checkpoint), reclaimable
                "store_bytes": store.nbytes,
                "dense_bytes": sum(t.numel() * t.element_size() for t in tensors),
                "slot_bytes": mixtral.expert_source.cache.nbytes,
                "checkpoint_bytes": sum(p.stat().st_size for p in Path(model).glob("*.safetensors")),
                "torch": torch.__version__,
            }
        )
    )


def rss_table(figures: dict[str, int]) -> str:
    model_bytes = figures["store_bytes"] + figures["dense_bytes"] + figures["slot_bytes"]
    grown = figures["peak_rss"] - figures["rss_before_load"]
    anon = figures["rss_anon_after_load"] - figures["rss_anon_before_load"]
    lines = [
        "| figure | MiB |",
        "|---|---|",
        f"| checkpoint on disk (safetensors) | {figures['checkpoint_bytes'] / MIB:.0f} |",
        f"| host store: every expert, packed once | {figures['store_bytes'] / MIB:.0f} |",
        f"| dense weights (attention, embeddings, lm_head, norms, gates) | {figures['dense_bytes'] / MIB:.0f} |",
        f"| expert slots (K=2 x layers) | {figures['slot_bytes'] / MIB:.0f} |",
        f"| = the loaded model's bytes | {model_bytes / MIB:.0f} |",
        f"| process RSS before loading (python + torch) | {figures['rss_before_load'] / MIB:.0f} |",
        f"| peak RSS (VmHWM) | {figures['peak_rss'] / MIB:.0f} |",
        f"| RSS after loading | {figures['rss_after_load'] / MIB:.0f} |",
        f"| of which anonymous (RssAnon: the process's own memory) | {figures['rss_anon_after_load'] / MIB:.0f} |",
        f"| of which mapped file pages (RssFile: shared libraries, and any checkpoint pages) | {figures['rss_file_after_load'] / MIB:.0f} |",
        "",
        f"Peak RSS grew by {grown / MIB:.0f} MiB while loading: {grown / model_bytes:.2f}x the loaded model's bytes. "
        f"The process's own (anonymous) memory grew by {anon / MIB:.0f} MiB: {anon / model_bytes:.2f}x.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: benchmarks/random_model.py's")
    parser.add_argument("--copy-ratio", type=float, default=4.0)
    parser.add_argument("--experts-per-layer", "-k", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(str(args.model), args.dtype)
        return

    from benchmarks.random_model import describe, write_random_model

    model = args.model or write_random_model()
    print(describe(model) + "\n")
    results: dict[str, Any] = {}
    if not args.skip_speed:
        from offload.bench.run import run_bench
        from offload.settings.flags import LoadFlags

        report = run_bench(
            model,
            LoadFlags(
                dtype=args.dtype,
                experts_per_layer=args.experts_per_layer,
                prefetch=args.prefetch,
                threads=args.threads,
            ),
            copy_ratio=args.copy_ratio,
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            runs=args.runs,
            ablate=True,
            variants=("resident", "full", "no-prefetch"),
            progress=lambda line: print(line, file=sys.stderr),
        ).as_dict()
        results["bench"] = report
        print(prefetch_table(report) + "\n")
    child = subprocess.run(
        [sys.executable, __file__, "--rss-child", "--model", str(model), "--dtype", args.dtype],
        capture_output=True,
        text=True,
        check=True,
    )
    results["rss"] = json.loads(child.stdout.strip().splitlines()[-1])
    print(rss_table(results["rss"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
