"""generation_config.json's eos_token_id: a reply stops at any id it lists, as transformers' generate does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from offload.engine import Engine
from offload.errors import CheckpointError
from offload.settings.flags import LoadFlags
from tests.baby import BabySpec, write_baby
from tests.test_cli_generate import sentencepiece_v1


@pytest.fixture(scope="module")
def talker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("gen-config")
    write_baby(BabySpec("gen-config", hidden_size=48, intermediate_size=64, vocab_size=32000), directory)
    shutil.copy(sentencepiece_v1(), directory / "tokenizer.model")
    return directory


def reply(directory: Path) -> tuple[list[int], str | None]:
    engine = Engine.load(directory, LoadFlags(threads=1))
    ids = engine.prompt_ids("Hello there", chat=False)
    tokens, last = [], None
    for last in engine.stream(ids, max_new_tokens=12, sampling=engine.sampling(temperature=0)):
        if last.token is not None:
            tokens.append(last.token)
    return tokens, last.finish_reason if last else None


def test_a_listed_end_id_ends_the_reply(talker: Path, tmp_path: Path) -> None:
    free, _ = reply(talker)
    end = next(token for token in free[2:] if token != 2)  # a token the greedy reply reaches, not </s>
    copy = tmp_path / "model"
    shutil.copytree(talker, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, end], "do_sample": False}))
    stopped, reason = reply(copy)
    assert stopped == free[: free.index(end) + 1] and reason == "stop"


@pytest.mark.parametrize("value", ["2", [2, -1], [2, 32000], True, [2.5]])
def test_a_bad_end_id_is_one_line_naming_the_file(talker: Path, tmp_path: Path, value: object) -> None:
    copy = tmp_path / "model"
    shutil.copytree(talker, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(
        CheckpointError, match=r"generation_config\.json: eos_token_id = .*: allowed is a token id"
    ):
        Engine.load(copy, LoadFlags(threads=1))
