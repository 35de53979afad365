"""The Mixtral-Instruct v1 chat template, as mistral-common's v1 tokenizer applies it.

A conversation becomes BOS followed by one segment per user or assistant message, each
tokenized on its own (so every segment gets its own leading "▁"):

    <s> "[INST] {system}\\n\\n{user} [/INST]" "{assistant}" </s> "[INST] {user} [/INST]" ...

`[INST]` and `[/INST]` are plain text in v1, not special tokens. The system prompt is
merged into the *first* user message only (v2 and later move it to the last one), so the
token prefix of a chat never changes as turns are added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from offload.errors import TokenizerError

ROLES = ("system", "user", "assistant")
_ORDER_RULE = (
    "roles must alternate user/assistant, starting with user, after an optional leading system message"
)


@dataclass(frozen=True)
class Segment:
    """One piece of a chat that the tokenizer encodes on its own."""

    text: str
    # "user": an "[INST] ... [/INST]" block; "assistant": a reply that the tokenizer closes with EOS.
    role: Literal["user", "assistant"]


def user_block(content: str, system: str | None = None) -> str:
    """The text of one user turn; `system`, when non-empty, goes first, followed by a blank line."""
    if system:
        content = f"{system}\n\n{content}"
    return f"[INST] {content} [/INST]"


def chat_segments(messages: Sequence[dict[str, str]]) -> list[Segment]:
    """Check a conversation and split it into the segments the v1 template tokenizes.

    `messages` are `{"role": "system"|"user"|"assistant", "content": str}` dicts. Only the
    first message may be a system message; after it, user and assistant messages alternate,
    starting with a user message. The chat may end with either role. An empty system prompt
    is dropped, as mistral-common does. Raises `TokenizerError` on anything else.
    """
    roles_and_contents = check_messages(messages)

    system = None
    if roles_and_contents and roles_and_contents[0][0] == "system":
        system = roles_and_contents.pop(0)[1]
    # After popping the system message, indices shift by one; keep the user-facing numbers right.
    offset = 1 if system is not None else 0
    if not roles_and_contents:
        raise TokenizerError("a chat needs at least one user message; " + _ORDER_RULE)

    segments: list[Segment] = []
    for position, (role, content) in enumerate(roles_and_contents):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise TokenizerError(
                f"chat message {position + offset} has role {role!r} where {expected!r} belongs; {_ORDER_RULE}"
            )
        if role == "user":
            segments.append(Segment(user_block(content, system if position == 0 else None), "user"))
        else:
            segments.append(Segment(content, "assistant"))
    return segments


def check_messages(messages: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    """The (role, content) of each message; a TokenizerError if one is not a {role, content} dict.

    Only the shape is checked here: the order of roles is each template's own rule.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"a chat must be a list of messages, got {type(messages).__name__}")
    return [_check_message(index, message) for index, message in enumerate(messages)]


def _check_message(index: int, message: object) -> tuple[str, str]:
    """The (role, content) of one message, or a TokenizerError saying what is wrong with it."""
    if not isinstance(message, dict):
        raise TokenizerError(
            f"chat message {index} must be a dict with 'role' and 'content', got {type(message).__name__}"
        )
    role = message.get("role")
    content = message.get("content")
    if role not in ROLES:
        raise TokenizerError(f"chat message {index} has role {role!r}; allowed roles: {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise TokenizerError(f"chat message {index} needs a string 'content', got {type(content).__name__}")
    return role, content
