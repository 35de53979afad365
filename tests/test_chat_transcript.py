"""When the context fills, only the window the model sees slides; the transcript keeps every turn."""

from __future__ import annotations

import json
from pathlib import Path

from offload.chat import SAVE_FORMAT, ChatSession
from offload.engine import Engine
from offload.generate import SamplingParams
from tests.test_chat_session import engine, reply  # noqa: F401  (engine is a fixture)


def test_a_full_context_keeps_every_message_in_the_transcript(engine: Engine, tmp_path: Path) -> None:  # noqa: F811
    turns = [
        {"role": role, "content": f"{role} turn {index}: " + "word " * 10}
        for index in range(41)
        for role in ("user", "assistant")
    ]
    long_chat = tmp_path / "long.json"
    long_chat.write_text(json.dumps({"format": SAVE_FORMAT, "system": "Be brief.", "messages": turns}))
    session = ChatSession(engine, sampling=SamplingParams(temperature=0), max_new_tokens=8)
    session.load(long_chat)
    assert len(session.messages) == 82
    reply(session, "One more question")
    assert session.dropped_turns > 0, "the 82 messages must overflow the baby's 512-token context"
    saved = json.loads(session.save(tmp_path / "after.json").read_text())
    assert len(saved["messages"]) == 84
    assert saved["messages"][:82] == turns
    assert saved["messages"][82]["content"] == "One more question"
    assert saved["system"] == "Be brief."
    # The model saw only the newest turns, which fit the context with room for the reply.
    assert len(session.tokens) <= engine.model.config.max_position_embeddings
