"""Streaming a reply's text as its tokens come: each piece once it is final (``Tokenizer.stream_decoder``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Tokenizer(Protocol):
    """What the decoder asks of ``offload.tokenizer.Tokenizer`` (not imported: it imports this module)."""

    def decode(self, ids: list[int]) -> str: ...
    def check_id(self, token_id: int) -> None: ...
    def held_bytes(self, held: bytes, token_id: int) -> bytes: ...
    def is_byte_piece(self, token_id: int) -> bool: ...


class StreamDecoder:
    """Turns a stream of token ids into text as soon as the text is final.

    The concatenation of every `push` and the final `flush` equals `Tokenizer.decode` of all ids (with a
    ``context``: the text that decoding them after it adds). Each push decodes only a short window: the
    tokens since the previous emission (`_read`) plus the ones before it back to `_prefix`. Decoding the
    window twice, with and without the new tokens, and emitting the difference keeps the spaces that a
    piece gets from its left neighbour, while the decoder's "drop the first piece's ▁" rule cancels out
    (it hits the same piece in both decodes). At the very start the window is empty, so the first piece
    of a reply loses its leading space, just as `decode` does; a raw completion's decoder starts from the
    prompt's last ids (``context``) instead, so its first word keeps its space, as in the text of prompt +
    completion. Byte pieces whose text a later token may still change (an unfinished UTF-8 character) are
    held back until it is final.
    """

    CONTEXT_IDS = 8  # the prompt's last ids kept as left context (more where a run of byte pieces spans it)

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        context = [int(token_id) for token_id in context]
        start = max(0, len(context) - self.CONTEXT_IDS)
        # Never from the middle of a run of byte pieces: its first bytes alone are no text (the whole run may
        # then decode as U+FFFDs), so the window starts where the run does.
        while (
            start > 0
            and tokenizer.is_byte_piece(context[start])
            and tokenizer.is_byte_piece(context[start - 1])
        ):
            start -= 1
        self._ids = context[start:]
        self._prefix = 0  # window start: decoded only for context, its text already emitted
        self._read = len(self._ids)  # tokens before this index have had their text emitted
        self._held_bytes = b""  # trailing byte-piece bytes whose text may still change

    def push(self, token_id: int) -> str:
        """Add one token; the new text, or "" while it may still change (a character split over byte pieces)."""
        token_id = int(token_id)
        self._tokenizer.check_id(token_id)
        self._ids.append(token_id)
        self._held_bytes = self._tokenizer.held_bytes(self._held_bytes, token_id)
        if self._held_bytes:
            # A later byte piece may complete the character; decoding now could emit U+FFFD.
            return ""
        return self._emit()

    def flush(self) -> str:
        """Whatever text is left (an unfinished character decodes as U+FFFD, as `decode` does)."""
        self._held_bytes = b""
        return self._emit()

    def _emit(self) -> str:
        decode = self._tokenizer.decode
        known = decode(self._ids[self._prefix : self._read])
        text = decode(self._ids[self._prefix :])
        if len(text) <= len(known):
            # Nothing new yet (BOS, EOS, or a lone "▁" that may still become a leading space):
            # keep the window so the next token is decoded with the same left context.
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(known) :]


def unfinished_utf8(data: bytes) -> bytes:
    """The tail of `data` that starts a UTF-8 character still missing bytes, else b""."""
    # A character is at most 4 bytes, so only the last 3 can be an unfinished start.
    for start in range(len(data) - 1, max(len(data) - 4, -1), -1):
        lead = data[start]
        if lead & 0b1100_0000 == 0b1000_0000:
            continue  # continuation byte: keep looking left for its lead byte
        if lead >= 0b1111_1000:
            needed = 1  # never a lead byte: decoders replace it on its own
        elif lead >= 0b1111_0000:
            needed = 4
        elif lead >= 0b1110_0000:
            needed = 3
        elif lead >= 0b1100_0000:
            needed = 2
        else:
            needed = 1
        return data[start:] if len(data) - start < needed else b""
    return b""
