"""`offload bench`: measure speed, cache figures and memory; `--ablate` compares the paper's variants."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cli import options
from cli.bench_view import bench_view
from offload.settings.flags import LoadFlags

MAX_RUNS = 10_000
MAX_COPY_RATIO = 1e6


def register(app: typer.Typer) -> None:
    """Add `bench` to ``app``."""
    app.command(
        help="Measure prefill and decode tok/s, TTFT, hit rate, prefetch recall and precision, bytes moved "
        "per token and memory per tier (median of --runs greedy runs after a warm-up).\n\n"
        "Example: offload bench -k 4 --link emulated:12\n\n"
        "Example: offload bench --ablate --copy-ratio 5 --json bench.json"
    )(options.load_flags()(bench))


def bench(
    model: options.Model = None,
    prompt_tokens: Annotated[
        int,
        typer.Option(
            help="Prompt length in tokens.",
            callback=options.bounded("--prompt-tokens", 1, options.MAX_TOKENS),
        ),
    ] = 32,
    new_tokens: Annotated[
        int,
        typer.Option(
            help="Tokens generated per run (EOS does not stop it); at least 2.",
            callback=options.bounded("--new-tokens", 2, options.MAX_TOKENS),
        ),
    ] = 32,
    runs: Annotated[
        int,
        typer.Option(
            help="Measured runs per row; speeds are their median.",
            callback=options.bounded("--runs", 1, MAX_RUNS),
        ),
    ] = 3,
    copy_ratio: Annotated[
        float | None,
        typer.Option(
            help="Emulate a link on which one expert copy takes this many times one layer's compute "
            "(measured on the resident model first). Replaces --link.",
            callback=options.bounded("--copy-ratio", 0, MAX_COPY_RATIO, above=True),
        ),
    ] = None,
    ablate: Annotated[
        bool,
        typer.Option(
            "--ablate",
            help="Compare resident, full (cache + prefetch), no prefetch, no cache and naive offloading at "
            "the same K (default half the experts) and link, in one process.",
        ),
    ] = False,
    flags: LoadFlags = options.FLAGS,
    json_file: Annotated[
        Path | None,
        typer.Option(
            "--json", help="Also write the report as JSON to FILE ('-': stdout only); checked before the run."
        ),
    ] = None,
) -> None:
    # Deferred: the engine imports torch, and `offload --help` must stay instant.
    from offload.bench.run import run_bench

    if json_file is not None and str(json_file) != "-":
        from cli.overwrite import check_writable

        check_writable(json_file, "--json")  # before the run, which may take minutes
    err = Console(stderr=True, highlight=False, emoji=False)
    report = run_bench(
        model,
        flags,
        copy_ratio=copy_ratio,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        runs=runs,
        ablate=ablate,
        progress=lambda line: err.print(f"[dim]{escape(line)}[/dim]") if err.is_terminal else None,
    ).as_dict()
    text = json.dumps(report, indent=1) + "\n"
    if json_file is not None and str(json_file) == "-":
        sys.stdout.write(text)
        return
    Console(highlight=False, emoji=False).print(
        bench_view(report)
    )  # first, so a failed write below loses nothing
    if json_file is not None:
        from offload.atomic import write_text_atomically
        from offload.errors import OffloadError

        try:
            write_text_atomically(json_file, text)
        except OSError as error:
            raise OffloadError(
                f"--json {json_file}: cannot write the report ({error.strerror or error}); the results are above"
            ) from None
