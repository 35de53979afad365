"""ChatSession keeps the KV cache across turns: a new turn prefills only its own tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from offload.chat import ChatSession
from offload.engine import Engine
from offload.generate import SamplingParams
from offload.loading import OffloadOptions, load_model
from offload.tokenizer import Tokenizer
from tests.baby import BabySpec, write_baby
from tests.test_cli_generate import sentencepiece_v1


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    directory = tmp_path_factory.mktemp("session-baby")
    write_baby(BabySpec("session", hidden_size=48, intermediate_size=64, vocab_size=32000), directory)
    shutil.copy(sentencepiece_v1(), directory / "tokenizer.model")
    model = load_model(directory, dtype="float32", offload=OffloadOptions(experts_per_layer=2, prefetch=1))
    return Engine(model, Tokenizer.from_dir(directory), directory)


def reply(session: ChatSession, text: str) -> tuple[list[int], object]:
    responses = list(session.send(text))
    return [r.token for r in responses if r.token is not None], responses[-1].timings


def test_second_turn_prefills_only_its_new_tokens(engine: Engine) -> None:
    session = ChatSession(engine, sampling=SamplingParams(temperature=0), max_new_tokens=6)
    _, first = reply(session, "Hello there, how are you?")
    assert first.prompt_tokens == len(
        engine.tokenizer.encode_chat([{"role": "user", "content": "Hello there, how are you?"}])
    )
    history = len(session.tokens)
    _, second = reply(session, "Tell me more")
    new_turn = engine.tokenizer.encode_turn("Tell me more")
    # The fed tokens: the last sampled token (never fed yet), the closing EOS if the reply was cut short, the turn.
    assert second.prompt_tokens <= len(new_turn) + 2
    assert second.prompt_tokens < history
    assert session.cache.length == len(session.tokens) - 1


def test_cached_turns_equal_a_fresh_recompute(engine: Engine) -> None:
    from offload.generate import generate_ids

    session = ChatSession(engine, sampling=SamplingParams(temperature=0), max_new_tokens=5)
    reply(session, "First question")
    second_ids, _ = reply(session, "Second question")
    prompt = session.tokens[: len(session.tokens) - len(second_ids)]
    # The whole conversation as one prompt on a fresh cache must continue identically.
    recomputed = generate_ids(engine.model, prompt, max_new_tokens=5, sampling=SamplingParams(temperature=0))
    assert recomputed == second_ids


def test_context_full_drops_oldest_turns(engine: Engine) -> None:
    session = ChatSession(engine, sampling=SamplingParams(temperature=0), max_new_tokens=100)
    long_text = "word " * 120
    for _ in range(4):
        reply(session, long_text)
    assert session.dropped_turns > 0
    assert len(session.tokens) <= engine.model.config.max_position_embeddings
    assert session.messages[-2]["content"] == long_text


def test_save_and_load_round_trip(engine: Engine, tmp_path: Path) -> None:
    session = ChatSession(
        engine, system="Be brief.", sampling=SamplingParams(temperature=0), max_new_tokens=4
    )
    reply(session, "Hi")
    path = session.save(tmp_path / "chat.json")
    restored = ChatSession(engine, sampling=SamplingParams(temperature=0), max_new_tokens=4)
    restored.load(path)
    assert restored.messages == session.messages and restored.system == "Be brief."
    with torch.no_grad():
        a, _ = reply(session, "Again")
        b, _ = reply(restored, "Again")
    assert a == b
