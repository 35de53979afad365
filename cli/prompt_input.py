"""Where generate's prompt comes from (argument, stdin or --prompt-file), read with bounded memory.

The source is checked first (a missing file costs nothing), and read once the model's config.json is
known, before its weights load: never more bytes than the model's context can use.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import typer

from offload.errors import ContextError, OffloadError


@dataclass
class PromptSource:
    text: str | None  # the prompt given as an argument
    stream: BinaryIO | None  # stdin, or the opened --prompt-file
    name: str  # what messages call it: "stdin" or "--prompt-file PATH"

    @classmethod
    def from_flags(cls, prompt: str | None, prompt_file: Path | None) -> PromptSource:
        """The prompt argument ('-' is stdin) or --prompt-file, exactly one of them."""
        if prompt is not None and prompt_file is not None:
            raise typer.BadParameter("give PROMPT or --prompt-file, not both", param_hint="--prompt-file")
        if prompt_file is not None:
            try:
                stream = open(prompt_file, "rb")  # noqa: SIM115 - read (and closed) after the model loads
            except OSError as err:
                raise OffloadError(f"--prompt-file {prompt_file}: {err.strerror}") from None
            return cls(None, stream, f"--prompt-file {prompt_file}")
        if prompt is None:
            raise typer.BadParameter(
                "give PROMPT, '-' to read stdin, or --prompt-file FILE", param_hint="PROMPT"
            )
        if prompt == "-":
            return cls(None, sys.stdin.buffer, "stdin")
        return cls(prompt, None, "the prompt")

    def read(self, context_tokens: int) -> str:
        """The prompt's text. Read text loses its one final line ending (`echo` and editors add it)."""
        if self.stream is None:
            return self.text or ""
        if self.stream.isatty():
            print("reading the prompt from stdin (Ctrl-D to end)", file=sys.stderr, flush=True)
        try:
            text = read_prompt(self.stream, context_tokens, self.name)
        finally:
            if self.stream is not sys.stdin.buffer:
                self.stream.close()
        return text.removesuffix("\n").removesuffix("\r")


def read_prompt(stream: BinaryIO, context_tokens: int, name: str = "stdin") -> str:
    """The UTF-8 text of ``stream``, refused (ContextError) past what ``context_tokens`` can hold.

    At most one byte more than the limit is read, so an endless stream (``< /dev/zero``) costs
    the limit, not all memory.
    """
    # Deferred: offload.generate imports torch, which the usage checks before loading do not need.
    from offload.generate import MAX_BYTES_PER_TOKEN, text_byte_limit

    limit = text_byte_limit(context_tokens)
    reach = f"the most ({MAX_BYTES_PER_TOKEN} per token) that the model's context of {context_tokens:,} tokens can hold"
    size = _file_size(stream)
    if size is not None and size > limit:
        raise ContextError(
            f"{name} is {size:,} bytes, more than the {limit:,} bytes, {reach}; shorten the prompt"
        )
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ContextError(f"{name} holds more than {limit:,} bytes, {reach}; shorten the prompt")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise OffloadError(f"{name} is not valid UTF-8 text (byte {err.start})") from None


def _file_size(stream: BinaryIO) -> int | None:
    """The size of a regular file behind ``stream`` (to name it in the error), else None."""
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # io.BytesIO and other streams with no file
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None
