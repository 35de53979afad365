"""`offload trace record|replay`: record a run's expert routing, then replay it against cache policies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from cli import options
from cli.prompt_input import read_prompt
from offload.errors import OffloadError
from offload.settings.flags import LoadFlags
from offload.settings.plan_tiers import MAX_HOST_MEMORY_GIB

if TYPE_CHECKING:
    from offload.engine import ResolvedModel

trace_app = typer.Typer(
    help="Record which experts a run routes to, then replay it against LRU, LRFU, LFU and Belady.\n\n"
    "Example: offload trace record demo.trace --prompt 'Explain LRU caches' && offload trace replay demo.trace",
    no_args_is_help=True,
)

DEFAULT_PROMPT = "Explain how a least-recently-used cache decides what to evict, with an example."
ALL_POLICIES = "lru,lrfu,lfu,belady,lru+prefetch,lrfu+prefetch"


@trace_app.command("record")
@options.load_flags(omit=("cache_policy", "link", "host_compute", "host_ratio"))  # routing depends on none
def record_command(
    out: Annotated[
        Path, typer.Argument(help="Where to write the trace (one safetensors file). Example: demo.trace")
    ],
    model: options.Model = None,
    prompt: Annotated[
        str | None,
        typer.Option(help="The prompt. Default: a short built-in question. Example: --prompt 'Hi'"),
    ] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="Read the prompt from this UTF-8 file. Example: --prompt-file q.txt")
    ] = None,
    no_chat: Annotated[bool, typer.Option("--no-chat", help="Raw completion: no chat template.")] = False,
    max_new_tokens: Annotated[
        int,
        typer.Option(
            help="Stop after this many new tokens.",
            callback=options.bounded(
                "--max-new-tokens", 1, options.MAX_TOKENS
            ),  # a trace records decode steps
        ),
    ] = 128,
    temperature: Annotated[
        float,
        typer.Option(
            help="Sampling temperature; 0 (greedy, the default here) makes traces repeatable.",
            callback=options.temperature_check,
        ),
    ] = 0.0,
    seed: options.Seed = None,
    flags: LoadFlags = options.FLAGS,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace OUT if it exists.")] = False,
) -> None:
    """Generate a reply while recording every layer's routing and the prefetcher's guesses.

    Routing does not depend on the cache, but the guesses are capped at K. When the profile keeps
    every expert resident, the experts are served through a cache of every expert instead, so the
    prefetcher runs and its guesses are recorded (--prefetch 0 records none).

    Example: offload trace record mixtral.trace --model ./Mixtral-8x7B-Instruct-v0.1 --prompt-file q.txt
    """
    # Deferred: the engine imports torch, and `offload --help` must stay instant.
    from cli.loading_view import load_engine
    from offload.engine import resolve_model
    from offload.trace.format import save_trace
    from offload.trace.recorder import TraceRecorder

    if prompt is not None and prompt_file is not None:
        raise typer.BadParameter("give --prompt or --prompt-file, not both", param_hint="--prompt")
    _check_out(out, force)
    resolved = resolve_model(model, flags)  # every flag checked before a weight is read
    options.check_max_new_tokens(max_new_tokens, resolved.config)
    text = _read_prompt(prompt, prompt_file, resolved.config.max_position_embeddings)
    engine = load_engine(_with_guesses(resolved))
    sampling = engine.sampling(temperature=temperature, seed=seed)
    prompt_ids = engine.prompt_ids(text, chat=not no_chat)
    name = model if model is not None and not Path(model).expanduser().is_dir() else engine.directory.name
    with TraceRecorder(engine.model, model_name=name) as recorder:
        for _ in engine.stream(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling):
            pass
    trace = recorder.trace()
    save_trace(trace, out)
    guessed = f"{int(trace.guess_counts.max())} guesses per layer" if trace.has_guesses else "no guesses"
    typer.echo(
        f"wrote {out}: {trace.steps} steps, {trace.tokens} tokens ({len(prompt_ids)} in the prompt), "
        f"{trace.num_layers} layers x {trace.num_experts} experts, {guessed}"
    )


def _check_out(out: Path, force: bool) -> None:
    """Before the model loads: OUT can be written, and replacing a file was asked for or agreed to."""
    import sys

    from cli.overwrite import check_new_file, check_writable

    def ask(question: str) -> bool:
        return typer.confirm(question, default=False, err=True)

    check_new_file(out, force=force, how_to_force="pass --force", ask=ask if sys.stdin.isatty() else None)
    check_writable(out, "trace record")


def _with_guesses(resolved: ResolvedModel) -> ResolvedModel:
    """The settings as resolved; but a cache of every expert where they would all be resident.

    Only the prefetching source makes guesses, and a resident model has none; a cache with a slot
    for every expert fits wherever every expert is resident. An explicit --experts-per-layer is kept.
    """
    offload = resolved.settings.offload
    if (
        resolved.flags.experts_per_layer is None
        and offload.experts_per_layer is None
        and offload.prefetch > 0
    ):
        return resolved.with_offload(experts_per_layer=resolved.config.num_local_experts)
    return resolved


@trace_app.command("replay")
def replay_command(
    trace_path: Annotated[
        Path, typer.Argument(metavar="TRACE", help="A trace from `offload trace record`. Example: demo.trace")
    ],
    policy: Annotated[
        str | None,
        typer.Option(help=f"Comma list of {ALL_POLICIES}. Default: all. Example: --policy lru,belady"),
    ] = None,
    experts_per_layer: Annotated[
        str | None,
        typer.Option(
            "--experts-per-layer",
            "-k",
            help="Slots per layer: a number, a comma list or a range. Default: 1 to every expert. "
            "Example: -k 1-4,8",
        ),
    ] = None,
    expert_bytes: Annotated[
        int | None,
        typer.Option(
            help="One expert's size in bytes, instead of the trace's. Example: --expert-bytes 176160768",
            callback=options.bounded("--expert-bytes", 1, 1 << 40),  # 1 TiB: far above any expert
        ),
    ] = None,
    host_memory: Annotated[
        float | None,
        typer.Option(
            help="Replay two levels: a host tier of this many GiB of experts under the device slots, the rest "
            "read from disk. Example: --host-memory 8",
            callback=options.bounded("--host-memory", 0, MAX_HOST_MEMORY_GIB, above=True),
        ),
    ] = None,
    host_experts: Annotated[
        int | None,
        typer.Option(
            help="Replay two levels: a host tier of this many experts times the layers, shared by every layer. "
            "Example: --host-experts 4",
            callback=options.bounded("--host-experts", 1, 1 << 16),
        ),
    ] = None,
    host_policy: Annotated[
        str | None,
        typer.Option(
            help="The host tier's policies, a comma list of adaptive (the tier's default),cyclic,lru,lrfu,lfu,belady, or "
            "lrfu:D for LRFU with decay D (belady is always shown). Default: all six. "
            "Example: --host-policy cyclic,lrfu:0.98",
        ),
    ] = None,
    host_counts: Annotated[
        str,
        typer.Option(
            help="What the host tier's lrfu and lfu count: accesses (every one, device hits too) or requests "
            "(only what reaches the tier, as adaptive and cyclic always do). Example: --host-counts requests",
        ),
    ] = "accesses",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Replay TRACE with K slots per layer under each policy: hit rate and bytes moved per token.

    Belady is the offline optimum (it knows the future); the last column says how many more
    loads each policy makes than Belady at the same K. With --host-memory or --host-experts, a host
    tier sits under the slots (two levels; -k 0: no slots, every expert computed from the tier); the
    device policy defaults to lrfu, and each row gives both levels and the disk reads against Belady's.

    Example: offload trace replay demo.trace --policy lru,lrfu,belady -k 1-8
    Example: offload trace replay demo.trace -k 0,2 --host-experts 4
    """
    # Deferred: traces need numpy, and `offload --help` must stay instant.
    from offload.trace.format import load_trace
    from offload.trace.replay import replay_table

    trace = load_trace(trace_path)
    if host_memory is not None or host_experts is not None or host_policy is not None:
        from cli.trace_tiers_view import replay_two_levels  # deferred with the rest of the replay

        policies = _parse_policies(policy or "lrfu", trace.has_guesses)
        ks = _parse_ks(experts_per_layer, trace.num_experts, lowest=0)
        replay_two_levels(trace, trace_path, policies, ks, host_memory, host_experts, host_policy, host_counts,
                          expert_bytes, as_json)  # fmt: skip
        return
    policies = _parse_policies(policy, trace.has_guesses)
    ks = _parse_ks(experts_per_layer, trace.num_experts)
    rows = replay_table(trace, policies, ks, expert_bytes)
    if as_json:
        from cli.trace_tiers_view import replay_summary  # deferred with the rest of the replay

        summary = {**replay_summary(trace, trace_path, expert_bytes), "rows": [row.as_dict() for row in rows]}
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_table(trace, rows, trace_path, policy is None and not trace.has_guesses)


def _read_prompt(prompt: str | None, prompt_file: Path | None, context_tokens: int) -> str:
    """--prompt, the default question, or --prompt-file read with a bound (no more than the context can use)."""
    if prompt_file is None:
        return prompt if prompt is not None else DEFAULT_PROMPT
    try:
        with prompt_file.open("rb") as stream:
            return read_prompt(stream, context_tokens, f"--prompt-file {prompt_file}")
    except OSError as err:
        raise OffloadError(f"--prompt-file {prompt_file}: {err.strerror}") from None


def _parse_policies(text: str | None, has_guesses: bool) -> list[str]:
    # Deferred: traces need numpy, and `offload --help` must stay instant.
    from offload.trace.replay import POLICIES

    if text is None:  # by default, skip the prefetch row when there is nothing to prefetch
        return [p for p in POLICIES if has_guesses or not p.endswith("+prefetch")]
    policies = options.comma_items(text, "--policy")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise typer.BadParameter(
            f"{unknown[0] if unknown else text!r} is not a policy: use {', '.join(POLICIES)}",
            param_hint="--policy",
        )
    return list(dict.fromkeys(policies))


def _parse_ks(text: str | None, num_experts: int, lowest: int = 1) -> list[int]:
    """'4', '1,2,4', '1-8' (or '1..8') or a mix, as sorted distinct K values in lowest..num_experts."""
    if text is None:
        return list(range(lowest, num_experts + 1))
    ks: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().replace("..", "-", 1).partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise typer.BadParameter(
                f"{text!r}: expected numbers, comma lists or ranges such as 1-8 or 1..8",
                param_hint="--experts-per-layer",
            ) from None
        if first > last:
            raise typer.BadParameter(
                f"{part.strip()!r} is a reversed range: write {last}-{first}",
                param_hint="--experts-per-layer",
            )
        if not lowest <= first <= last <= num_experts:
            raise typer.BadParameter(
                f"{part.strip()!r} is out of range: the trace's layers have {num_experts} experts, "
                f"so K runs from {lowest} to {num_experts}",
                param_hint="--experts-per-layer",
            )
        ks.update(range(first, last + 1))
    return sorted(ks)


def _print_table(trace, rows, trace_path: Path, skipped_prefetch: bool) -> None:
    console = Console(emoji=False)
    with_bytes = rows[0].bytes_moved is not None if rows else False
    title = escape(
        f"{trace.model or trace_path.name}: {trace.steps} steps, {trace.tokens} tokens, "
        f"{trace.num_layers} layers x {trace.num_experts} experts (top-{trace.top_k})"
    )
    table = Table("K", Column("policy", no_wrap=True), "hit rate", "misses", "loads/token", title=title)
    if with_bytes:
        table.add_column("MiB/token", justify="right")
    table.add_column("loads vs Belady", justify="right")
    belady = {row.experts_per_layer: row.loads for row in rows if row.policy == "belady"}
    previous_k = None
    for row in rows:
        k = row.experts_per_layer
        if previous_k is not None and k != previous_k:
            table.add_section()
        previous_k = k
        cells = [
            str(k),
            row.policy,
            _percent(row.hit_rate),
            str(row.misses),
            _number(row.loads_per_token),
        ]
        if with_bytes:
            per_token = row.bytes_per_token
            cells.append("-" if per_token is None else f"{per_token / 2**20:.2f}")
        cells.append(_versus(row.loads, belady.get(k), row.policy == "belady"))
        table.add_row(*cells)
    console.print(table)
    console.print(
        "Belady knows the future: the fewest loads possible (exact when no step needs more than K experts).\n"
        "Loads count every copy, wasted prefetches included."
    )
    if not with_bytes:
        console.print("The trace does not record an expert's size: give --expert-bytes for bytes per token.")
    if skipped_prefetch:
        console.print("No prefetch guesses in this trace (record with --prefetch N), so no +prefetch rows.")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _versus(loads: int, optimum: int | None, is_optimum: bool) -> str:
    if is_optimum:
        return "optimum"
    if optimum is None:
        return "-"
    if optimum == 0:
        return "=" if loads == 0 else "+inf"
    return f"{loads / optimum:.2f}x"


def register(app: typer.Typer) -> None:
    """Add `trace record|replay` to ``app``."""
    app.add_typer(trace_app, name="trace")
