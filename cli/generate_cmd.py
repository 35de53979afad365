"""`offload generate`: one prompt in, the reply streamed out (or one JSON object)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cli import options
from offload.errors import FlagError
from offload.settings.flags import LoadFlags


def register(app: typer.Typer) -> None:
    """Add `generate` to ``app``."""
    app.command(
        help="Generate a reply to PROMPT ('-' reads stdin, --prompt-file reads a file).\n\n"
        "Example: offload generate 'What does json.dumps do?'\n\n"
        "Example: offload generate --prompt-file question.txt --stop '\\n\\n' --repetition-penalty 1.1\n\n"
        "Example: offload generate --no-chat --temperature 0 --max-new-tokens 16 --json 'Hello'"
    )(options.load_flags()(generate))


def generate(
    prompt: Annotated[
        str | None, typer.Argument(help="The prompt, or '-' to read it from stdin.", show_default=False)
    ] = None,
    prompt_file: Annotated[
        Path | None,
        typer.Option(help="Read the prompt from this UTF-8 file. Example: --prompt-file question.txt"),
    ] = None,
    model: options.Model = None,
    no_chat: Annotated[bool, typer.Option("--no-chat", help="Raw completion: no chat template.")] = False,
    system: options.System = None,
    max_new_tokens: options.MaxNewTokens = None,
    temperature: options.Temperature = None,
    top_p: options.TopP = None,
    top_k: options.TopK = None,
    seed: options.Seed = None,
    min_p: options.MinP = None,
    repetition_penalty: options.RepetitionPenalty = None,
    stop: options.Stop = None,
    flags: LoadFlags = options.FLAGS,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with ids, text and timings.")
    ] = False,
) -> None:
    # Deferred: the engine imports torch, and `offload --help` must stay instant.
    from cli.loading_view import load_engine
    from cli.prompt_input import PromptSource
    from offload.engine import resolve_model

    if no_chat and system is not None:
        raise FlagError(
            "--system needs the chat template, which --no-chat turns off: "
            "put the text in the prompt itself, or leave out --no-chat"
        )
    source = PromptSource.from_flags(prompt, prompt_file)
    resolved = resolve_model(model, flags)  # every flag checked before a weight is read
    options.check_max_new_tokens(max_new_tokens, resolved.config)
    # Read once the model's context is known, so that the read stops where the context does.
    text = source.read(resolved.config.max_position_embeddings)
    load_started = time.perf_counter()
    engine = load_engine(resolved, quiet=as_json, summary=False)
    load_seconds = time.perf_counter() - load_started
    sampling = engine.sampling(
        temperature, top_p, top_k, seed, min_p=min_p, repetition_penalty=repetition_penalty
    )
    prompt_ids = engine.prompt_ids(text, chat=not no_chat, system=system)
    max_new_tokens = engine.max_new_tokens(max_new_tokens, len(prompt_ids))
    token_ids: list[int] = []
    pieces: list[str] = []
    last = None
    stop_strings = options.stop_strings(stop)
    for last in engine.stream(
        prompt_ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_strings=stop_strings,
        continues_text=no_chat,
    ):
        if last.token is not None:
            token_ids.append(last.token)
        pieces.append(last.text)
        if not as_json:
            sys.stdout.write(last.text)
            sys.stdout.flush()
    if as_json:
        import torch

        result = {
            "prompt_ids": prompt_ids,
            "token_ids": token_ids,
            "text": "".join(pieces),
            "finish_reason": last.finish_reason if last else None,
            "timings": last.timings.as_dict() if last else {},
            "cache": engine.cache_stats(),
            "host_tier": engine.host_tier_stats(),  # None unless experts are read from disk (--host-memory)
            "threads": torch.get_num_threads(),  # torch's CPU threads while it ran (--threads)
            "dtype": str(engine.model.dtype).removeprefix(
                "torch."
            ),  # the compute dtype (a host tier: as stored)
            "load_seconds": load_seconds,  # reading the weights and building the model, before the prompt
        }
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        if token_ids:
            sys.stdout.write("\n")
        if last is not None and last.finish_reason == "length" and max_new_tokens > 0:
            sys.stdout.flush()
            print(f"(reply cut at --max-new-tokens {max_new_tokens})", file=sys.stderr)
