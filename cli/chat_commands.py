"""The slash commands of `offload chat`: /help, /set, /retry, /save, /load, /reset, /stats, /exit."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable

from rich.markup import escape

from offload.settings.limits import MAX_SEED, MAX_TOP_K

HELP = """Commands:
  /help              this list
  /set               show the settings below
  /set temperature X sampling temperature; 0 is greedy (also top_p X, top_k N, seed N or none,
                     max_new_tokens N: the longest reply)
  /set system TEXT   a new system prompt (/set system alone removes it); the conversation stays
  /retry             forget the last reply and generate another (the same one when greedy or seeded)
  /stats             cache hit rate per layer, prefetch recall, bytes moved, speed
  /reset             forget the conversation
  /save FILE         write the conversation to FILE (JSON); asks before replacing a file
  /save! FILE        write it to FILE, replacing FILE if it exists
  /load FILE         restore a conversation saved with /save
  /exit              quit (Ctrl-D works too)
A line ending in \\ goes on on the next line; \"\"\" on a line of its own opens and closes a block of lines.
Ctrl-C stops a reply and keeps the conversation. Every turn is saved to $OFFLOAD_HOME/chats;
`offload chat --resume` goes on with the latest chat."""

SAMPLING = {"temperature": float, "top_p": float, "top_k": int, "seed": int}


def run_command(text: str, session, out, autosave, *, reply: Callable[[str], None]) -> str | None:
    """Run the slash command ``text``; "exit" when the chat should end. ``reply`` streams a reply to a text."""
    from offload.errors import OffloadError

    name, _, argument = text.partition(" ")
    argument = argument.strip()
    try:
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/help":
            out.print(HELP, markup=False)
        elif name == "/reset":
            session.reset()
            autosave.start_new()  # the cleared conversation stays in its file
            out.print("[dim]conversation cleared[/dim]")
        elif name == "/stats":
            from cli.stats_view import stats_table

            out.print(stats_table(session))
        elif name in ("/save", "/save!", "/load") and not argument:
            out.print(f"[red]usage:[/red] {name} FILE")
        elif name in ("/save", "/save!"):
            _save(session, argument, force=name == "/save!", out=out)
        elif name == "/set":
            _set(session, argument, out)
        elif name == "/retry":
            reply(session.retry())
        elif name == "/load":
            session.load(argument)
            autosave.start_new()
            out.print(f"[dim]loaded {len(session.messages)} messages from {escape(argument)}[/dim]")
        else:
            out.print(f"[red]unknown command {escape(name)}[/red]; /help lists them")
    except (OffloadError, OSError) as problem:
        # OSError too: a file operation that fails must never end the chat and lose the conversation.
        error(out, problem)
    return None


def _save(session, argument: str, *, force: bool, out) -> None:
    from cli.overwrite import check_new_file, terminal_question
    from offload.chat import user_path

    path = user_path(argument)
    ask = terminal_question if sys.stdin.isatty() else None
    check_new_file(path, force=force, how_to_force=f"/save! {argument}", ask=ask)
    out.print(f"[dim]saved to {escape(str(session.save(path)))}[/dim]")


def error(out, error: object) -> None:
    """One error line; the chat goes on."""
    # soft_wrap: the terminal wraps the line itself, so a path in the message is never cut by a newline.
    out.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)


def _set(session, argument: str, out) -> None:
    from offload.errors import OffloadError

    key, _, value = argument.partition(" ")
    key, value = key.replace("-", "_"), value.strip()
    if not key:
        sampling = session.sampling
        out.print(
            f"temperature {sampling.temperature:g} · top_p {sampling.top_p:g} · top_k {sampling.top_k} · "
            f"seed {sampling.seed} · max_new_tokens {session.max_new_tokens} · "
            f"system {escape(repr(session.system)) if session.system else 'none'}",
            soft_wrap=True,
        )
        return
    if key == "system":
        session.set_system(value or None)
        out.print("[dim]system prompt " + ("set" if value else "removed") + "[/dim]")
        return
    if key not in (*SAMPLING, "max_new_tokens"):
        raise OffloadError(
            f"/set {key}: unknown setting; one of {', '.join([*SAMPLING, 'max_new_tokens', 'system'])}"
        )
    if key == "max_new_tokens":
        session.max_new_tokens = _integer(
            key, value, 1, session.engine.model.config.max_position_embeddings - 1
        )
    elif key == "seed" and value.lower() == "none":
        session.sampling = dataclasses.replace(session.sampling, seed=None)
    elif key == "seed":  # the ranges of --seed and --top-k
        session.sampling = dataclasses.replace(session.sampling, seed=_integer(key, value, 0, MAX_SEED))
    elif SAMPLING[key] is int:
        session.sampling = dataclasses.replace(session.sampling, **{key: _integer(key, value, 0, MAX_TOP_K)})
    else:
        session.sampling = dataclasses.replace(session.sampling, **{key: _number(key, value)})
    out.print(f"[dim]{key} = {escape(value)}[/dim]")


def _integer(key: str, value: str, low: int, high: int) -> int:
    from offload.errors import OffloadError

    try:
        number = int(value)
    except ValueError:
        raise OffloadError(f"/set {key} {value!r}: expected a whole number from {low} to {high}") from None
    if not low <= number <= high:
        raise OffloadError(f"/set {key} {number}: out of range, expected {low} to {high}")
    return number


def _number(key: str, value: str) -> float:
    from offload.errors import OffloadError

    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise OffloadError(f"/set {key} {value!r}: expected a number")
    return number
