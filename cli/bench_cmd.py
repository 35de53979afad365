"""`offload bench`: measure speed, cache figures and memory; `--ablate` compares the paper's variants."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cli import options
from cli.bench_view import bench_view


def register(app: typer.Typer) -> None:
    """Add `bench` to ``app``."""
    app.command(
        help="Measure prefill and decode tok/s, TTFT, hit rate, prefetch recall and precision, bytes moved "
        "per token and memory per tier (median of --runs greedy runs after a warm-up).\n\n"
        "Example: offload bench -k 4 --link emulated:12\n\n"
        "Example: offload bench --ablate --copy-ratio 5 --json bench.json"
    )(bench)


def bench(
    model: options.Model = None,
    profile: options.Profile = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 32,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per run (EOS does not stop it).")] = 32,
    runs: Annotated[int, typer.Option(help="Measured runs per row; speeds are their median.")] = 3,
    link: options.Link = None,
    copy_ratio: Annotated[
        float | None,
        typer.Option(
            help="Emulate a link on which one expert copy takes this many times one layer's compute "
            "(measured on the resident model first). Replaces --link."
        ),
    ] = None,
    experts_per_layer: options.ExpertsPerLayer = None,
    prefetch: options.Prefetch = None,
    cache_policy: options.CachePolicy = None,
    ablate: Annotated[
        bool,
        typer.Option(
            "--ablate",
            help="Compare resident, full (cache + prefetch), no prefetch, no cache and naive offloading at "
            "the same K (default half the experts) and link, in one process.",
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(help="torch's CPU threads (default: one per core). 1 is steadier on a busy machine."),
    ] = None,
    dtype: options.Dtype = None,
    device: options.Device = None,
    quant: options.Quant = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON to FILE ('-': stdout only).")
    ] = None,
) -> None:
    # Deferred: the engine imports torch, and `offload --help` must stay instant.
    from offload.bench.run import run_bench

    err = Console(stderr=True, highlight=False)
    report = run_bench(
        model,
        profile=profile,
        device=device,
        dtype=dtype,
        quant=quant,
        experts_per_layer=experts_per_layer,
        prefetch=prefetch,
        cache_policy=cache_policy,
        link=link,
        copy_ratio=copy_ratio,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        runs=runs,
        ablate=ablate,
        threads=threads,
        progress=lambda line: err.print(f"[dim]{line}[/dim]") if err.is_terminal else None,
    ).as_dict()
    text = json.dumps(report, indent=1) + "\n"
    if json_file is not None and str(json_file) == "-":
        sys.stdout.write(text)
        return
    if json_file is not None:
        json_file.write_text(text)
    Console(highlight=False).print(bench_view(report))
