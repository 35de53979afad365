"""`offload chat`: an interactive chat in the terminal, streaming replies."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cli import options
from cli.chat_commands import error as _error
from cli.chat_commands import run_command
from cli.chat_input import read_message
from offload.errors import OffloadError
from offload.settings.flags import LoadFlags


def register(app: typer.Typer) -> None:
    """Add `chat` to ``app``."""
    app.command(
        help="Chat in the terminal with streaming replies.\n\n"
        "Example: offload chat\n\nExample: offload chat --model ./my-mixtral --system 'Answer briefly.'\n\n"
        "Example: offload chat --resume"
    )(options.load_flags()(chat))


def chat(
    model: options.Model = None,
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
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Go on with the latest chat saved in $OFFLOAD_HOME/chats, or NAME."),
    ] = False,
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="NAME",
            help="With --resume: a chat in $OFFLOAD_HOME/chats (e.g. 20261201-154500-4242) or a chat file.",
        ),
    ] = None,
) -> None:
    # Deferred: the engine imports torch, and `offload --help` must stay instant.
    from cli.loading_view import load_engine
    from offload.chat import ChatSession
    from offload.chat_autosave import Autosave, chats_dir, find_saved_chat
    from offload.engine import resolve_model

    if name is not None and not resume:
        raise typer.BadParameter(f"{name!r}: a chat NAME goes after --resume", param_hint="NAME")
    directory = chats_dir()
    resumed = find_saved_chat(name, directory) if resume else None  # before the model loads
    out = Console(highlight=False, emoji=False)
    resolved = resolve_model(model, flags)  # every flag checked before a weight is read
    options.check_max_new_tokens(max_new_tokens, resolved.config)
    engine = load_engine(resolved)
    session = ChatSession(
        engine,
        system=system,
        sampling=engine.sampling(
            temperature, top_p, top_k, seed, min_p=min_p, repetition_penalty=repetition_penalty
        ),
        stop_strings=options.stop_strings(stop),
        # Half the context at most by default, so a reply always leaves room for the conversation.
        max_new_tokens=engine.max_new_tokens(
            max_new_tokens, engine.model.config.max_position_embeddings // 2
        ),
    )
    autosave = Autosave(directory)
    if resumed is not None:
        session.load(resumed)
        if system is not None:
            session.system = system
        if resumed.parent.resolve() == directory.resolve():
            autosave = Autosave(directory, resumed)  # the same conversation goes on in the same file
        out.print(f"[dim]resumed {len(session.messages)} messages from {escape(str(resumed))}[/dim]")
    _enable_line_editing()
    # Bytes that are not UTF-8 then reach ChatSession.send, which refuses the line and keeps the chat;
    # a strict stdin would raise in input() and lose the rest of what was typed or piped.
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdin.reconfigure(errors="surrogateescape")
    out.print(
        "[dim]Type a message, /help for commands, Ctrl-D to quit. Each turn is saved to "
        f"{escape(str(autosave.path))}; `offload chat --resume` goes on with it.[/dim]",
        soft_wrap=True,
    )
    with _signals_end_the_chat():
        try:
            _loop(session, out, autosave)
        finally:
            # On /exit, Ctrl-D, SIGTERM and SIGHUP alike; a reply cut short is already in the transcript.
            _autosave(autosave, session, out)


def _loop(session, out, autosave) -> None:
    def reply(text: str) -> None:
        _reply(session, text, out)

    while True:
        try:
            message = read_message(input)
        except KeyboardInterrupt:
            out.print("\n[dim](Ctrl-D or /exit quits)[/dim]")
            continue
        except EOFError:
            out.print()
            return
        text = message.text.strip()
        if not text:
            continue
        # Only a plain line is a command: a block of lines is a message, even one starting with /.
        if text.startswith("/") and message.plain:
            if run_command(text, session, out, autosave, reply=reply) == "exit":
                return
        else:
            reply(text)
        _autosave(autosave, session, out)


def _autosave(autosave, session, out) -> None:

    try:
        autosave.save(session)
    except OffloadError as error:
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            _error(out, f"autosave failed: {error}; /save FILE keeps this chat")


@contextlib.contextmanager
def _signals_end_the_chat() -> Iterator[None]:
    """SIGTERM and SIGHUP (the terminal closed) end the chat as /exit does, so the last save runs."""

    def end(signum: int, frame: object) -> None:
        for number in handled:
            signal.signal(number, signal.SIG_IGN)  # a second signal must not cut the final save short
        raise SystemExit(128 + signum)

    handled = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {number: signal.signal(number, end) for number in handled}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _reply(session, text: str, out) -> None:
    # Deferred: torch takes seconds to import, and `offload --help` must stay instant.
    import torch

    stream = session.send(text)
    last = None
    dropped = session.dropped_turns
    try:
        for last in stream:
            out.file.write(last.text)
            out.file.flush()
    except KeyboardInterrupt:
        out.print("\n[dim](reply stopped; the conversation is kept)[/dim]")
    except OffloadError as error:
        out.print()
        _error(out, error)
    except (torch.OutOfMemoryError, MemoryError):
        # The partial turn is kept (ChatSession.send's finally); hand the memory back and go on.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        out.print(
            "\n[red]error:[/red] out of memory during the reply; the conversation is kept. "
            "Try /reset, a shorter message, --max-new-tokens, or a profile with fewer experts per layer"
        )
    finally:
        stream.close()
    if session.dropped_turns > dropped:
        out.print(
            f"\n[yellow]context full: the model no longer sees the {session.dropped_turns - dropped} oldest "
            "turn(s); /save still writes every turn[/yellow]"
        )
    out.print()
    if last is not None and last.finish_reason == "length" and session.max_new_tokens > 0:
        out.print(f"[yellow](reply cut at --max-new-tokens {session.max_new_tokens})[/yellow]")
    if last is not None:
        timings = last.timings
        status = f"{timings.decode_tokens_per_second:.1f} tok/s · TTFT {timings.ttft_seconds:.2f} s"
        stats = session.engine.cache_stats()
        if stats is not None and stats.get("hit_rate") is not None:
            status += f" · hit rate {stats['hit_rate']:.0%}"
        out.print(f"[dim]{status}[/dim]")


def _enable_line_editing() -> None:
    # Importing readline gives input() line editing and history where the platform has it.
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401
