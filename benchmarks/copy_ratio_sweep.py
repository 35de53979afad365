"""Where prefetching pays: the ablation's ratios as one expert copy grows from cheap to dear.

For each copy ratio r (one expert copy = r x one layer's measured decode compute) and each prefetch
count, one `offload bench --ablate` process-run of resident, full, no-prefetch and naive at K = E/2.
On a serial link, prefetching cannot cut the bytes moved (a right guess is a load that would have
happened anyway, a wrong one is an extra load), it can only overlap copies with compute. So its
gain is at most (compute + copies) / max(compute, copies): large when r is small, near 1 when the
link is the bottleneck, and below 1 when wrong guesses delay the misses queued behind them.

    python benchmarks/copy_ratio_sweep.py --model offload/demo --ratios 0.5,1,2,5 --prefetch 1,2 --runs 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offload/demo")
    parser.add_argument("--ratios", default="0.5,1,2,5")
    parser.add_argument("--prefetch", default="1,2")
    parser.add_argument("--experts-per-layer", "-k", default=None, help="default: half the experts")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--cache-policy", default=None, help="lrfu or lru (default: the profile's, lrfu)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from offload.bench.run import run_bench
    from offload.settings.flags import LoadFlags

    reports = []
    print(
        "| copy ratio r | prefetch | full tok/s | full / no-prefetch | full / naive | full / resident "
        "| hit rate | recall | precision | loads/token full | loads/token no-prefetch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ratio in (float(r) for r in args.ratios.split(",")):
        for prefetch in (int(p) for p in args.prefetch.split(",")):
            report = run_bench(
                args.model,
                LoadFlags(
                    dtype=args.dtype,
                    experts_per_layer=args.experts_per_layer,
                    prefetch=prefetch,
                    cache_policy=args.cache_policy,
                    threads=args.threads,
                ),
                copy_ratio=ratio,
                prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens,
                runs=args.runs,
                ablate=True,
                variants=("resident", "full", "no-prefetch", "naive"),
                progress=lambda line: print(line, file=sys.stderr),
            ).as_dict()
            reports.append(report)
            rows = {row["name"]: row for row in report["rows"]}
            speed = {name: row["decode_tokens_per_second"] for name, row in rows.items()}
            full, bare = rows["full"]["decode"], rows["no-prefetch"]["decode"]
            print(
                f"| {ratio:g} | {prefetch} | {speed['full']:.1f} | {speed['full'] / speed['no-prefetch']:.2f} "
                f"| {speed['full'] / speed['naive']:.2f} | {speed['full'] / speed['resident']:.2f} "
                f"| {full['hit_rate']:.0%} | {full['prefetch_recall']:.0%} | {full['prefetch_precision']:.0%} "
                f"| {full['loads_per_token']:.2f} | {bare['loads_per_token']:.2f} |",
                flush=True,
            )
    machine = reports[-1]["machine"]
    print(
        f"\n{reports[-1]['model']}, {reports[-1]['dtype']}, K={reports[-1]['experts_per_layer']}, "
        f"prompt {reports[-1]['prompt']['tokens']}, {reports[-1]['new_tokens']} new tokens, medians of {args.runs} "
        f"interleaved runs; {machine['torch_threads']} threads; load average at the end {machine['load_average_end']}"
    )
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1) + "\n")


if __name__ == "__main__":
    main()
