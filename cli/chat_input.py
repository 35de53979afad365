"""Reading one chat message, which may span lines: a trailing backslash continues it, and \"\"\" opens a block."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

PROMPT = ">>> "
CONTINUED = "... "
BLOCK = '"""'


class Message(NamedTuple):
    text: str
    plain: bool  # typed as one line, neither continued nor a block: only then is "/..." a command


def read_message(read: Callable[[str], str]) -> Message:
    """One message from ``read`` (``input``, or a stand-in): lines joined with newlines.

    A line ending in ``\\`` goes on on the next line. A line starting with \"\"\" opens a block that a line
    ending in \"\"\" closes; the quotes are not part of the message. End of input inside a message ends
    the message (the next read then ends the chat); Ctrl-C propagates, dropping it.
    """
    line = read(PROMPT)
    if line.lstrip().startswith(BLOCK):
        return Message(_block(line.lstrip()[len(BLOCK) :], read), plain=False)
    if not line.endswith("\\"):
        return Message(line, plain=True)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            line = read(CONTINUED)
        except EOFError:
            return Message("\n".join(lines), plain=False)
    lines.append(line)
    return Message("\n".join(lines), plain=False)


def _block(first: str, read: Callable[[str], str]) -> str:
    if first.rstrip().endswith(BLOCK):  # """one line"""
        return first.rstrip()[: -len(BLOCK)]
    lines = [first] if first.strip() else []
    while True:
        try:
            line = read(CONTINUED)
        except EOFError:
            break
        if line.rstrip().endswith(BLOCK):
            last = line.rstrip()[: -len(BLOCK)]
            if last:
                lines.append(last)
            break
        lines.append(line)
    return "\n".join(lines)
