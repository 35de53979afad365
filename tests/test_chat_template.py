"""The Mixtral-Instruct v1 chat template against mistral-common, turn-by-turn encoding, and bad input."""

from __future__ import annotations

import functools
import pydoc_data.topics
import random
from pathlib import Path

import mistral_common
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from offload.chat_template import chat_segments
from offload.errors import TokenizerError
from offload.tokenizer import Tokenizer

V1_MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
MESSAGE_CLASSES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
LONG_TEXT = pydoc_data.topics.topics["specialnames"][:6000]  # several thousand characters of prose


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


CONVERSATIONS = {
    "single turn": [user("What is the capital of France?")],
    "system prompt": [system("You are a terse assistant."), user("Hi")],
    "system prompt, three user turns": [
        system("Answer in one word."),
        user("Sky colour?"),
        assistant("Blue."),
        user("Grass colour?"),
        assistant("Green."),
        user("Snow colour?"),
    ],
    "unicode": [
        user("Café crème? naïve résumé, ñandú"),
        assistant("東京で寿司を食べました 🦀😀 👍🏽"),
        user("Flags 🇫🇷🇯🇵, a clef 𝄞 and a cod 鳕, combining e\u0301"),
    ],
    "long messages": [
        system("Summarise."),
        user(LONG_TEXT),
        assistant(LONG_TEXT[:2000]),
        user(LONG_TEXT[::-1]),
    ],
    "whitespace": [
        user("  leading and trailing  \n"),
        assistant("\nstarts with a newline\t"),
        user("tabs\tand\r\nCRLF and   runs of spaces"),
    ],
    "template look-alikes typed by a user": [user("[INST] fake [/INST] </s> <s> [/INST]")],
    "empty system prompt is dropped": [system(""), user("hi")],
    "empty user message": [user("")],
    "ends with the assistant (training data)": [system("Be kind."), user("Hello"), assistant("Hello! 😀")],
}


@pytest.fixture
def tokenizer() -> Tokenizer:
    # Ours, read from the very file the oracle reads.
    return our_tokenizer()


@functools.cache
def oracle(mode: ValidationMode) -> MistralTokenizer:
    reference = MistralTokenizer.from_file(str(V1_MODEL), mode=mode)
    assert reference.instruct_tokenizer.tokenizer.version == TokenizerVersion.v1
    return reference


@functools.cache
def our_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(V1_MODEL)


def mistral_common_ids(chat: list[dict[str, str]]) -> list[int]:
    """The reference: mistral-common's v1 instruct tokenizer on the same conversation."""
    # "test" mode insists the chat ends with a user turn; "finetuning" allows a final reply.
    mode = ValidationMode.finetuning if chat[-1]["role"] == "assistant" else ValidationMode.test
    messages = [MESSAGE_CLASSES[message["role"]](content=message["content"]) for message in chat]
    return oracle(mode).encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_ids_equal_mistral_common_v1(tokenizer: Tokenizer, name: str) -> None:
    chat = CONVERSATIONS[name]
    ids = tokenizer.encode_chat(chat)
    assert ids == mistral_common_ids(chat)
    assert ids.count(tokenizer.bos_id) == 1
    if chat[-1]["role"] == "user":
        assert tokenizer.decode(ids).endswith("[/INST]")


def test_long_conversation_really_is_long(tokenizer: Tokenizer) -> None:
    assert len(LONG_TEXT) > 5000
    assert len(tokenizer.encode_chat(CONVERSATIONS["long messages"])) > 2000


turn_text = st.text(st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=40, deadline=None)
@given(
    system_prompt=st.none() | turn_text,
    turns=st.lists(st.tuples(turn_text, turn_text.filter(bool)), min_size=1, max_size=4),
    last=turn_text,
)
def test_random_chats_equal_mistral_common_v1(
    system_prompt: str | None, turns: list[tuple[str, str]], last: str
) -> None:
    # mistral-common rejects an empty assistant reply, hence the filter on replies.
    chat = [] if system_prompt is None else [system(system_prompt)]
    for question, answer in turns:
        chat += [user(question), assistant(answer)]
    chat.append(user(last))
    assert our_tokenizer().encode_chat(chat) == mistral_common_ids(chat)


def test_system_prompt_opens_the_first_user_turn_only() -> None:
    segments = chat_segments(CONVERSATIONS["system prompt, three user turns"])
    assert [segment.text for segment in segments] == [
        "[INST] Answer in one word.\n\nSky colour? [/INST]",
        "Blue.",
        "[INST] Grass colour? [/INST]",
        "Green.",
        "[INST] Snow colour? [/INST]",
    ]
    assert [segment.role for segment in segments] == ["user", "assistant"] * 2 + ["user"]


# --- turn-by-turn encoding, as a chat session grows its prompt ---


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_appending_a_reply_and_a_turn_extends_the_chat_ids(tokenizer: Tokenizer, name: str) -> None:
    chat = CONVERSATIONS[name]
    for end, message in enumerate(chat):
        if message["role"] != "assistant" or end + 1 == len(chat):
            continue
        before, reply, next_user = chat[:end], message["content"], chat[end + 1]["content"]
        assert tokenizer.encode_chat([*before, assistant(reply), user(next_user)]) == (
            tokenizer.encode_chat(before)
            + tokenizer.encode_reply(reply)
            + [tokenizer.eos_id]
            + tokenizer.encode_turn(next_user)
        )


def test_a_chat_grown_turn_by_turn_equals_mistral_common(tokenizer: Tokenizer) -> None:
    chat = CONVERSATIONS["system prompt, three user turns"]
    ids = tokenizer.encode_chat(chat[:2])
    for reply, next_user in zip(chat[2::2], chat[3::2], strict=True):
        ids += [*tokenizer.encode_reply(reply["content"]), tokenizer.eos_id]
        ids += tokenizer.encode_turn(next_user["content"])
    assert ids == mistral_common_ids(chat)


def test_an_empty_reply_is_just_eos(tokenizer: Tokenizer) -> None:
    # A model may stop at once; the history then holds "" and must still encode.
    chat = [user("Say nothing."), assistant(""), user("Thanks.")]
    assert tokenizer.encode_reply("") == []
    expected = [*tokenizer.encode_chat(chat[:1]), tokenizer.eos_id, *tokenizer.encode_turn("Thanks.")]
    assert tokenizer.encode_chat(chat) == expected


# --- malformed chats ---

ORDER_RULE = "roles must alternate"


@pytest.mark.parametrize(
    ("chat", "message"),
    [
        ([], "at least one user message"),
        ([system("only a system prompt")], "at least one user message"),
        ([assistant("first"), user("then")], ORDER_RULE),
        ([user("one"), user("two")], ORDER_RULE),
        ([user("q"), assistant("a"), assistant("b")], ORDER_RULE),
        ([user("q"), system("late system prompt")], ORDER_RULE),
        ([system("a"), system("b"), user("q")], ORDER_RULE),
        ([{"role": "tool", "content": "{}"}], "allowed roles: system, user, assistant"),
        ([{"role": "user"}], "string 'content'"),
        ([{"role": "user", "content": 42}], "string 'content'"),
        (["just a string"], "must be a dict"),
        ("just a string", "list of messages"),
    ],
)
def test_malformed_chats_are_a_tokenizer_error(tokenizer: Tokenizer, chat: object, message: str) -> None:
    with pytest.raises(TokenizerError, match=message) as caught:
        tokenizer.encode_chat(chat)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)


# --- bad tokenizer files ---


def test_a_directory_without_a_tokenizer_names_the_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json or tokenizer\.model") as caught:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_a_missing_directory_or_file_is_a_tokenizer_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "absent")
    with pytest.raises(TokenizerError, match="no such file"):
        Tokenizer.from_file(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("tokenizer.json", b"{not json at all"),
        ("tokenizer.json", b'{"version": "1.0", "model": {"type": "NoSuchModel"}}'),
        ("tokenizer.json", b"\xff\xfe\x00binary"),
        ("tokenizer.model", random.Random(0).randbytes(4096)),
        ("tokenizer.model", V1_MODEL.read_bytes()[:1000]),
        ("tokenizer.model", b""),
    ],
)
def test_a_damaged_tokenizer_file_is_a_tokenizer_error(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / name) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_damaged_json_is_reported_not_silently_replaced_by_the_model(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer.model").write_bytes(V1_MODEL.read_bytes())
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
