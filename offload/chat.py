"""A multi-turn chat that keeps its KV cache across turns, so earlier turns are never recomputed.

The conversation is kept twice: as messages (the transcript, what /save writes) and as the token
ids the cache holds. A new turn feeds only the ids the cache has not seen. When the context fills,
the window the model sees slides past the oldest turns and the rest is prefilled again; the
transcript keeps every turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from offload.atomic import write_text_atomically
from offload.config import read_json
from offload.engine import Engine
from offload.errors import ContextError, OffloadError
from offload.generate import Response, SamplingParams, Timings, check_text_fits
from offload.kv_cache import KVCache

SAVE_FORMAT = "offload-chat/1"


@dataclass
class ChatSession:
    engine: Engine
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 512
    stop_strings: tuple[str, ...] = ()  # a reply ends at any of these; the stop text is not kept
    messages: list[dict[str, str]] = field(default_factory=list)  # the transcript: every user/assistant turn
    tokens: list[int] = field(default_factory=list)  # every id of the window so far
    dropped_turns: int = 0  # turns slid out of the window to make room, over the session's life
    window_start: int = 0  # messages[window_start:] is what the model sees
    cache: KVCache | None = None
    last_timings: Timings | None = None  # the last reply's speed (/stats shows it)
    # (tokens, window_start) just before the last turn, so /retry can rewind without a recompute
    _before_turn: tuple[list[int], int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages, self.tokens, self.window_start = [], [], 0
        self._before_turn = None
        if self.cache is None:
            model = self.engine.model
            self.cache = KVCache(model.config, 256, dtype=model.dtype, device=model.device)
        self.cache.truncate(0)

    def _chat(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages[self.window_start :]

    def _ids_for(self, user_text: str) -> list[int]:
        """All ids of the conversation with ``user_text`` appended, reusing what the cache holds."""
        tokenizer = self.engine.tokenizer
        if not self.tokens or not tokenizer.incremental_chat:
            # A checkpoint's own template is encoded whole each turn; the cache keeps the common prefix.
            return tokenizer.encode_chat([*self._chat(), {"role": "user", "content": user_text}])
        ids = list(self.tokens)
        if ids[-1] != tokenizer.eos_id:
            ids.append(tokenizer.eos_id)  # a reply cut short still closes with EOS, as the template wants
        return ids + tokenizer.encode_turn(user_text)

    def _room(self) -> int:
        return self.engine.model.config.max_position_embeddings

    def _fit(self, user_text: str) -> list[int]:
        """Ids for the next turn, sliding the window past the oldest turns until a reply of max_new_tokens fits."""
        ids = self._ids_for(user_text)
        while len(ids) + self.max_new_tokens > self._room() and self.window_start < len(self.messages):
            self.window_start += 2  # one user turn and its reply; the transcript keeps both
            self.dropped_turns += 1
            self.tokens, self._before_turn = [], None
            self.cache.truncate(0)
            ids = self._ids_for(user_text)
        if len(ids) + self.max_new_tokens > self._room():
            raise ContextError(
                f"this message ({len(ids)} tokens) plus max_new_tokens {self.max_new_tokens} does not fit the "
                f"context of {self._room()} tokens; send a shorter message"
            )
        return ids

    def send(self, user_text: str) -> Iterator[Response]:
        """Stream the reply to ``user_text``. Stopping early (Ctrl-C) keeps the partial reply."""
        if not _is_text(user_text):
            # A terminal that sends bytes that are not UTF-8 gives Python lone surrogates, which no tokenizer takes.
            raise OffloadError("this message is not valid UTF-8 text; type it again")
        check_text_fits(user_text, self._room(), "this message")
        before = (list(self.tokens), self.window_start)
        ids = self._fit(user_text)
        self._before_turn = before if self.window_start == before[1] else None  # a slid window recomputes
        # The cache holds a prefix of self.tokens; what ids share of it stays, the rest is prefilled.
        self.cache.truncate(_common_prefix(ids, self.tokens[: self.cache.length]))
        fed = ids[self.cache.length :]
        self.messages.append({"role": "user", "content": user_text})
        self.tokens = ids
        reply: list[int] = []
        shown: list[str] = []
        stop = None
        try:
            for response in self.engine.stream(
                fed,
                max_new_tokens=self.max_new_tokens,
                sampling=self.sampling,
                stop_strings=self.stop_strings,
                cache=self.cache,
            ):
                if response.token is not None:
                    reply.append(response.token)
                shown.append(response.text)
                stop = response.stop
                self.last_timings = response.timings
                yield response
        finally:
            # Runs on completion, on error and on Ctrl-C alike, so the turn is never lost.
            tokenizer = self.engine.tokenizer
            # A reply ended by a stop string ends where it began: the transcript keeps what was shown.
            text = (
                tokenizer.decode([t for t in reply if t != tokenizer.eos_id])
                if stop is None
                else "".join(shown)
            )
            if stop is None or not tokenizer.incremental_chat:
                self.tokens = ids + reply
            else:
                # The model must see the reply as the transcript holds it; the cache keeps the common prefix.
                self.tokens = ids + tokenizer.encode_reply(text)
                generated = ids + reply[:-1]  # what the cache holds: the last token was never fed
                self.cache.truncate(min(self.cache.length, _common_prefix(generated, self.tokens)))
            self.messages.append({"role": "assistant", "content": text})

    def retry(self) -> str:
        """Forget the last user turn and its reply, and return the user turn, to be sent again."""
        if len(self.messages) - self.window_start < 2:
            raise OffloadError("nothing to retry: no reply yet")
        user_text = self.messages[-2]["content"]
        self.messages = self.messages[:-2]
        tokens = self._before_turn[0] if self._before_turn is not None else []
        # The cache holds a prefix of self.tokens; what it shares with the earlier tokens stays, so
        # only the turn is prefilled again.
        self.cache.truncate(_common_prefix(self.tokens[: self.cache.length], tokens))
        self.tokens, self._before_turn = tokens, None
        return user_text

    def set_system(self, system: str | None) -> None:
        """A new system prompt; the conversation stays, and the next turn prefills it again."""
        if system is not None and not _is_text(system):
            raise OffloadError("this system prompt is not valid UTF-8 text; type it again")
        self.system = system or None
        self.tokens, self._before_turn = [], None
        self.cache.truncate(0)

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON, atomically: the old file or the new one, never half of one.

        Any failure to write (no permission, a directory in the way, a full disk) is an OffloadError.
        """
        path = user_path(path)
        payload = {"format": SAVE_FORMAT, "system": self.system, "messages": self.messages}
        try:
            write_text_atomically(path, json.dumps(payload, ensure_ascii=False, indent=2) + "\n")
        except (OSError, ValueError) as err:  # ValueError: a NUL byte in the name
            raise OffloadError(f"{path}: cannot write the chat there ({_reason(err)})") from None
        return path

    def load(self, path: str | Path) -> None:
        """Replace the conversation with a saved one; the next turn prefills it."""
        path = user_path(path)
        system, messages = read_chat_save(path)
        chat = ([{"role": "system", "content": system}] if system else []) + messages
        if messages:
            try:
                self.engine.tokenizer.encode_chat(chat)  # the template's own checks, with this tokenizer
            except OffloadError as err:
                raise OffloadError(f"{path}: {err}") from None
        self.reset()
        self.system, self.messages = system, messages


def user_path(path: str | Path) -> Path:
    """A path the user typed, with ``~`` expanded; an unknown ``~user`` is an OffloadError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise OffloadError(f"{path}: cannot find the home directory this path names") from None


def _reason(err: Exception) -> str:
    return (err.strerror if isinstance(err, OSError) else None) or str(err)


def read_chat_save(path: Path) -> tuple[str | None, list[dict[str, str]]]:
    """The (system prompt, messages) of a file ``ChatSession.save`` wrote; any damage is an OffloadError.

    The messages must be what a session holds: user and assistant turns in pairs, each with a string
    content, so the chat can go on with a user turn. Extra keys in a message are dropped.
    """
    if path.is_dir():
        raise OffloadError(f"{path}: is a directory, not a chat file")
    if not path.is_file():
        raise OffloadError(f"{path}: no such chat file")
    payload = read_json(path, OffloadError)
    if not isinstance(payload, dict) or payload.get("format") != SAVE_FORMAT:
        raise OffloadError(f'{path}: not a saved chat (expected "format": "{SAVE_FORMAT}")')
    messages, system = payload.get("messages"), payload.get("system")
    if not isinstance(messages, list) or not (system is None or isinstance(system, str)):
        raise OffloadError(f"{path}: 'messages' must be a list and 'system' a string or null")
    if system is not None and not _is_text(system):
        raise OffloadError(f"{path}: 'system' is not valid Unicode text")
    turns = []
    for index, message in enumerate(messages):
        role = "user" if index % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != role:
            raise OffloadError(
                f"{path}: message {index} must have role {role!r}; a saved chat alternates user and assistant"
            )
        if not isinstance(message.get("content"), str) or not _is_text(message["content"]):
            raise OffloadError(f"{path}: message {index} needs a string 'content' of valid Unicode text")
        turns.append({"role": role, "content": message["content"]})
    if len(turns) % 2:
        # A session always closes a user turn with a reply (maybe empty); two user turns in a row
        # would make every later message fail.
        raise OffloadError(f"{path}: the last message must be an assistant reply")
    return system, turns


def _common_prefix(first: list[int], second: list[int]) -> int:
    """How many leading ids the two lists share."""
    for index, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return index
    return min(len(first), len(second))


def _is_text(text: str) -> bool:
    # JSON may spell a lone surrogate ("\\ud800"); the tokenizers cannot encode it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
