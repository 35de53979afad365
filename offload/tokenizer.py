"""Tokenizer: a `tokenizer.json` (HF `tokenizers`) or a `tokenizer.model` (sentencepiece) behind one API.

Mixtral's files encode text the sentencepiece way: a leading "▁" is added to the text, every
space becomes "▁", and characters outside the vocabulary fall back to `<0xNN>` byte pieces. A
tokenizer.json is used exactly as the `tokenizers` library reads it (only with special tokens
left off), so a file with a Metaspace pre-tokenizer behaves as that library makes it behave.
Chat encoding follows mistral-common's v1 template (see `offload.chat_template`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from offload.chat_template import chat_segments, check_messages, user_block
from offload.errors import TokenizerError
from offload.jinja_template import JinjaTemplate, TokenizerConfig
from offload.stream_decoder import StreamDecoder, unfinished_utf8

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _Backend(Protocol):
    """What `Tokenizer` needs from a tokenizer library."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    # token id -> byte value for the byte-fallback pieces "<0x00>" ... "<0xFF>"
    byte_values: dict[int, int]

    # the text of each special token (BOS, EOS, control tokens, a template's markers) -> its id
    special_tokens: dict[str, int]

    def encode(self, text: str) -> list[int]: ...

    def encode_special(self, text: str) -> list[int]:
        """Like encode, but the text of a special token becomes that token (for a rendered template)."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def held_bytes(self, held: bytes, token_id: int) -> bytes:
        """After `token_id`, the trailing bytes whose text a later token may still change."""
        ...


class _SentencePieceBackend:
    def __init__(self, path: Path) -> None:
        import sentencepiece

        try:
            self._model = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as error:  # sentencepiece raises OSError or RuntimeError depending on the damage
            raise TokenizerError(
                f"{path}: not a readable sentencepiece model ({_first_line(error)}); "
                "expected a tokenizer.model file"
            ) from error
        model = self._model
        self.vocab_size = model.get_piece_size()
        self.bos_id = model.bos_id() if model.bos_id() >= 0 else None
        self.eos_id = model.eos_id() if model.eos_id() >= 0 else None
        self.byte_values = {
            i: int(model.id_to_piece(i)[3:5], 16) for i in range(self.vocab_size) if model.is_byte(i)
        }
        self.special_tokens = {
            model.id_to_piece(i): i
            for i in range(self.vocab_size)
            if model.is_control(i) or model.is_unknown(i)
        }
        self._special_pattern = _alternation(self.special_tokens)

    def encode(self, text: str) -> list[int]:
        return self._model.encode(text)

    def encode_special(self, text: str) -> list[int]:
        # sentencepiece reads "<s>" as text; split it out first, as transformers' slow tokenizers do.
        ids: list[int] = []
        for index, part in enumerate(self._special_pattern.split(text) if self._special_pattern else [text]):
            if index % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids += self._model.encode(part)
        return ids

    def decode(self, ids: list[int]) -> str:
        # sentencepiece already drops control tokens (BOS, EOS) and the first piece's "▁".
        return self._model.decode(ids)

    def held_bytes(self, held: bytes, token_id: int) -> bytes:
        # sentencepiece replaces each invalid byte on its own, and any other token (control ones
        # included) ends a byte run, so only an unfinished character can still change.
        byte_value = self.byte_values.get(token_id)
        return b"" if byte_value is None else unfinished_utf8(held + bytes([byte_value]))


class _HuggingFaceBackend:
    def __init__(self, path: Path) -> None:
        import tokenizers
        from tokenizers import decoders

        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for bad JSON or schema
            raise TokenizerError(
                f"{path}: not a readable tokenizer.json ({_first_line(error)}); "
                "expected a Hugging Face `tokenizers` file"
            ) from error
        # User text that spells "<s>" or "</s>" must stay text, as it does with sentencepiece.
        tokenizer.encode_special_tokens = True
        # Some hub files enable padding or truncation; ids must be the text's ids, whatever its length.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if tokenizer.decoder is None:
            # Without a decoder, ids decode to raw pieces ("▁word<0x0A>"); use the Llama-family one.
            tokenizer.decoder = decoders.Sequence(
                [
                    decoders.Replace("▁", " "),
                    decoders.ByteFallback(),
                    decoders.Fuse(),
                    decoders.Strip(" ", 1, 0),
                ]
            )
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = tokenizer.token_to_id("<s>")
        self.eos_id = tokenizer.token_to_id("</s>")
        self.byte_values = {}
        for piece, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
            match = _BYTE_PIECE.fullmatch(piece)
            if match:
                self.byte_values[token_id] = int(match.group(1), 16)
        # Byte pieces may be registered as special tokens (a trainer's `special_tokens`); they are text.
        self.special_tokens = {
            added.content: token_id
            for token_id, added in tokenizer.get_added_tokens_decoder().items()
            if added.special and token_id not in self.byte_values
        }
        self._skip_ids = frozenset(self.special_tokens.values()) | {
            i for i in (self.bos_id, self.eos_id) if i is not None
        }

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_special(self, text: str) -> list[int]:
        # Exactly what transformers' fast tokenizer does with a rendered chat template.
        self._tokenizer.encode_special_tokens = False
        try:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self._tokenizer.encode_special_tokens = True

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode([i for i in ids if i not in self._skip_ids], skip_special_tokens=False)

    def held_bytes(self, held: bytes, token_id: int) -> bytes:
        # The ByteFallback decoder turns a whole run of byte pieces into U+FFFDs when any byte of
        # it is invalid, and skipped ids do not end a run, so a run stays open until a text token.
        byte_value = self.byte_values.get(token_id)
        if byte_value is not None:
            return held + bytes([byte_value])
        return held if token_id in self._skip_ids else b""


class Tokenizer:
    """Text <-> token ids, the Mixtral-Instruct v1 chat template, and streaming detokenization."""

    def __init__(self, backend: _Backend, source: Path, config: TokenizerConfig | None = None) -> None:
        self._backend = backend
        self.source = source  # the file the tokenizer was read from, for messages
        self.bos_id: int | None = backend.bos_id
        self.eos_id: int | None = backend.eos_id
        self.vocab_size: int = backend.vocab_size
        # The checkpoint's own chat template; None means Mixtral-Instruct v1 (offload.chat_template).
        self.template: JinjaTemplate | None = None
        if config is not None:
            self._configure(config)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` from a model directory, or `tokenizer.model` when there is no json,
        with the directory's chat template and special tokens (tokenizer_config.json) when it has them.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise TokenizerError(f"{directory}: not a directory; expected a model directory with a tokenizer")
        for name in ("tokenizer.json", "tokenizer.model"):
            if (directory / name).is_file():
                return cls.from_file(directory / name, TokenizerConfig.from_dir(directory))
        raise TokenizerError(f"{directory}: no tokenizer found; expected tokenizer.json or tokenizer.model")

    def _configure(self, config: TokenizerConfig) -> None:
        """Take BOS and EOS from the config's names, and its template unless it is Mistral's v1."""
        for attribute, name in (("bos_id", "bos_token"), ("eos_id", "eos_token")):
            piece = config.special_tokens.get(name)
            if piece is not None and piece in self._backend.special_tokens:
                setattr(self, attribute, self._backend.special_tokens[piece])
        # In v1, "[INST]" is text, not a special token; mistral-common's encoding of it is exact.
        if config.template is not None and not _is_mistral_v1(config.template, self._backend.special_tokens):
            self.template = JinjaTemplate(config.template, config.template_source, config.special_tokens)

    @property
    def incremental_chat(self) -> bool:
        """Whether a chat's next turn is `encode_reply` and `encode_turn` appended (v1), or the whole
        chat must be encoded again (a checkpoint's template, which may rewrite earlier turns).
        """
        return self.template is None

    @classmethod
    def from_file(cls, path: str | Path, config: TokenizerConfig | None = None) -> Tokenizer:
        """Load one tokenizer file: `.json` through `tokenizers`, anything else through sentencepiece;
        ``config`` (the model directory's tokenizer_config.json) adds its template and special tokens.
        """
        file = Path(path)
        if not file.is_file():
            raise TokenizerError(f"{file}: no such file; expected a tokenizer.json or tokenizer.model")
        backend = _HuggingFaceBackend(file) if file.suffix == ".json" else _SentencePieceBackend(file)
        return cls(backend, file, config)

    def check_fits(self, vocab_size: int, config_path: Path) -> None:
        """Refuse a tokenizer whose ids run past the model's embedding (``vocab_size`` rows).

        Such ids would fail deep in the model (an IndexError in the embedding) on the first prompt
        that uses them; they mean the tokenizer belongs to another model.
        """
        if self.vocab_size > vocab_size:
            raise TokenizerError(
                f"{self.source}: the tokenizer has {self.vocab_size} tokens but {config_path} says "
                f"vocab_size {vocab_size}, so ids {vocab_size}..{self.vocab_size - 1} have no embedding; "
                "use the tokenizer that came with this model"
            )

    def _text(self, text: str) -> str:
        # Non-UTF-8 bytes in argv arrive as lone surrogates, which the libraries cannot encode.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise TokenizerError(f"the text is not valid UTF-8 (character {err.start})") from None
        return text

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` (with sentencepiece's leading "▁"); BOS first only when asked."""
        ids = self._backend.encode(self._text(text))
        return [self._require("bos_id"), *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, skipping BOS, EOS and other control tokens; a leading "▁" becomes nothing."""
        ids = [int(token_id) for token_id in ids]  # numpy or tensor scalars become plain ints
        for token_id in ids:
            self.check_id(token_id)
        return self._backend.decode(ids)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation, ready for the assistant's reply.

        With the checkpoint's own template: the template rendered (as transformers renders it, with
        the generation prompt), then encoded with its special tokens read as such. Otherwise the
        Mixtral-Instruct v1 template, exactly as mistral-common's v1: one BOS, then
        `[INST] ... [/INST]` per user turn and `reply </s>` per assistant turn; the system prompt, if
        any, opens the first user turn. Raises `TokenizerError` if roles are out of order.
        """
        if self.template is not None:
            checked = [{"role": role, "content": content} for role, content in check_messages(messages)]
            return self._backend.encode_special(self._text(self.template.render(checked)))
        ids = [self._require("bos_id")]
        for segment in chat_segments(messages):
            ids += self._backend.encode(self._text(segment.text))
            if segment.role == "assistant":
                ids.append(self._require("eos_id"))
        return ids

    def encode_reply(self, text: str) -> list[int]:
        """An assistant reply's ids as the chat template encodes them, without the closing EOS."""
        return self._backend.encode(self._text(text))

    def encode_turn(self, user_text: str) -> list[int]:
        """The ids that start the next user turn after a finished reply (which ended with EOS).

        `encode_chat(chat + [reply, user])` equals
        `encode_chat(chat) + encode_reply(reply) + [eos_id] + encode_turn(user)`.
        """
        return self._backend.encode(self._text(user_block(user_text)))

    def stream_decoder(self, context: Sequence[int] = ()) -> StreamDecoder:
        """A fresh incremental decoder for one reply; ``context``: the ids the reply's text continues (a raw
        completion's prompt), so that its first piece keeps the space it has after them."""
        return StreamDecoder(self, context)

    def _require(self, attribute: str) -> int:
        token_id = getattr(self, attribute)
        if token_id is None:
            token = "<s>" if attribute == "bos_id" else "</s>"
            raise TokenizerError(f"{self.source}: has no {token} token; the chat template needs <s> and </s>")
        return token_id

    def held_bytes(self, held: bytes, token_id: int) -> bytes:
        """After ``token_id``, the trailing bytes whose text a later token may still change (``held``: those
        held before it); b"" once the text is final.
        """
        return self._backend.held_bytes(held, token_id)

    def is_byte_piece(self, token_id: int) -> bool:
        """Whether ``token_id`` is a byte-fallback piece ("<0x00>" ... "<0xFF>")."""
        return token_id in self._backend.byte_values

    def check_id(self, token_id: int) -> None:
        """Raise TokenizerError unless ``token_id`` is in the vocabulary."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(
                f"{self.source}: token id {token_id} is out of range; allowed: 0 to {self.vocab_size - 1}"
            )


def _is_mistral_v1(template: str, special_tokens: dict[str, int]) -> bool:
    """Mixtral-Instruct's template: "[INST]" written as text (later Mistral tokenizers make it a token)."""
    return "[INST]" in template and "[/INST]" in template and "[INST]" not in special_tokens


def _alternation(pieces: dict[str, int]) -> re.Pattern[str] | None:
    """A pattern that splits text at any of ``pieces`` (longest first), keeping them; None if none."""
    if not pieces:
        return None
    return re.compile("(" + "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True)) + ")")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
