"""`offload generate`: one prompt in, the reply streamed out (or one JSON object)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from cli import options
from offload.settings.flags import LoadFlags


def register(app: typer.Typer) -> None:
    """Add `generate` to ``app``."""
    app.command(
        help="Generate a reply to PROMPT ('-' reads stdin).\n\n"
        "Example: offload generate 'What does json.dumps do?'\n\n"
        "Example: offload generate --no-chat --temperature 0 --max-new-tokens 16 --json 'Hello'"
    )(options.load_flags()(generate))


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt, or '-' to read it from stdin.")],
    model: options.Model = None,
    no_chat: Annotated[bool, typer.Option("--no-chat", help="Raw completion: no chat template.")] = False,
    system: options.System = None,
    max_new_tokens: options.MaxNewTokens = None,
    temperature: options.Temperature = None,
    top_p: options.TopP = None,
    top_k: options.TopK = None,
    seed: options.Seed = None,
    flags: LoadFlags = options.FLAGS,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with ids, text and timings.")
    ] = False,
) -> None:
    # Deferred: the engine imports torch, and `offload --help` must stay instant.
    from cli.loading_view import load_engine
    from cli.prompt_input import read_prompt
    from offload.engine import resolve_model

    resolved = resolve_model(model, flags)  # every flag checked before a weight is read
    options.check_max_new_tokens(max_new_tokens, resolved.config)
    if prompt == "-":
        # Read once the model's context is known, so that the read stops where the context does.
        prompt = read_prompt(sys.stdin.buffer, resolved.config.max_position_embeddings)
    engine = load_engine(resolved, quiet=as_json, summary=False)
    sampling = engine.sampling(temperature, top_p, top_k, seed)
    prompt_ids = engine.prompt_ids(prompt, chat=not no_chat, system=system)
    max_new_tokens = engine.max_new_tokens(max_new_tokens, len(prompt_ids))
    token_ids: list[int] = []
    pieces: list[str] = []
    last = None
    for last in engine.stream(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling):
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
            "threads": torch.get_num_threads(),  # torch's CPU threads while it ran (--threads)
        }
        sys.stdout.write(json.dumps(result) + "\n")
    elif token_ids:
        sys.stdout.write("\n")
