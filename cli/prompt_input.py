"""Reading a prompt from stdin with bounded memory: never more bytes than the context can use."""

from __future__ import annotations

from typing import BinaryIO


def read_prompt(stream: BinaryIO, context_tokens: int, name: str = "stdin") -> str:
    """The UTF-8 text of ``stream``, refused (ContextError) past what ``context_tokens`` can hold.

    At most one byte more than the limit is read, so an endless stream (``< /dev/zero``) costs
    the limit, not all memory.
    """
    from offload.errors import ContextError, OffloadError
    from offload.generate import MAX_BYTES_PER_TOKEN, text_byte_limit

    limit = text_byte_limit(context_tokens)
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ContextError(
            f"{name} holds more than {limit:,} bytes, the most ({MAX_BYTES_PER_TOKEN} per token) that the "
            f"model's context of {context_tokens:,} tokens can hold; shorten the prompt"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise OffloadError(f"{name} is not valid UTF-8 text (byte {err.start})") from None
