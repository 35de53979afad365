"""Text that cannot fit the context is refused before it is tokenized, and stdin is read with a bound.

Tokenizing costs about 200 times the text's size in memory: `offload generate - < /dev/zero` grew to
24 GB before it was killed. The baby models here have a context of 512 tokens: 8,192 bytes at most.
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import pytest

from offload.chat import ChatSession
from offload.engine import Engine
from offload.errors import ContextError
from offload.settings.flags import LoadFlags
from tests.baby import BabySpec, write_baby
from tests.test_cli_generate import offload_here, sentencepiece_v1

LIMIT = 16 * 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("prompt-size-baby")
    write_baby(BabySpec("prompt-size", hidden_size=48, intermediate_size=64, vocab_size=32000), directory)
    shutil.copy(sentencepiece_v1(), directory / "tokenizer.model")
    return directory


class EndlessZeros(io.RawIOBase):
    """/dev/zero that fails the test once a reader takes far more than the prompt limit."""

    def __init__(self) -> None:
        self.given = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        self.given += len(buffer)
        assert self.given <= 1 << 20, "stdin was read far past what the context can hold"
        buffer[:] = b"\0" * len(buffer)
        return len(buffer)


def run_generate(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, *args: str, stdin: io.RawIOBase
):
    from cli.main import run

    monkeypatch.setattr(sys, "argv", ["offload", "generate", *args])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(stdin)))
    with pytest.raises(SystemExit) as exited:
        run()
    return exited.value.code, capfd.readouterr().err


def test_endless_stdin_is_refused_after_a_bounded_read(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    stdin = EndlessZeros()
    code, err = run_generate(monkeypatch, capfd, "--model", str(model_dir), "-", stdin=stdin)
    assert code == 2
    assert f"stdin holds more than {LIMIT:,} bytes" in err and "context of 512 tokens" in err
    assert len(err.strip().splitlines()) == 1
    assert stdin.given <= 2 * LIMIT + 65536  # the limit plus one buffer, not the whole stream


@pytest.mark.parametrize("size", [LIMIT + 1, 5 * LIMIT])
def test_a_prompt_argument_too_long_for_the_context_names_both_sizes(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, size: int
) -> None:
    code, _, err = offload_here(
        monkeypatch, capfd, "generate", "--model", str(model_dir), "é" * (size // 2 + 1)
    )
    assert code == 2
    assert f"the prompt is {2 * (size // 2 + 1):,} bytes" in err
    assert f"{LIMIT:,} bytes (16 per token)" in err and "context of 512 tokens" in err
    assert len(err.strip().splitlines()) == 1


def test_text_within_the_limit_still_reaches_the_token_count_check(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    code, _, err = offload_here(
        monkeypatch, capfd, "generate", "--model", str(model_dir), "--no-chat", "a " * 2000
    )
    assert code == 2
    assert "tokens" in err and "bytes" not in err


def test_a_chat_line_too_long_is_refused_before_tokenizing_and_the_chat_goes_on(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offload.generate import SamplingParams

    engine = Engine.load(model_dir, LoadFlags(dtype="float32"))
    session = ChatSession(engine, sampling=SamplingParams(temperature=0), max_new_tokens=4)
    list(session.send("Hello"))
    before = list(session.messages)

    def no_tokenizing(*_: object, **__: object) -> None:
        raise AssertionError("the oversized message was tokenized")

    monkeypatch.setattr(engine.tokenizer, "encode_turn", no_tokenizing)
    monkeypatch.setattr(engine.tokenizer, "encode_chat", no_tokenizing)
    with pytest.raises(ContextError, match=f"this message is {LIMIT + 1:,} bytes.*context of 512 tokens"):
        list(session.send("x" * (LIMIT + 1)))
    assert session.messages == before


def test_trace_record_reads_its_prompt_file_with_the_same_bound(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    (tmp_path / "big.txt").write_bytes(b"word " * 2000)
    args = ("trace", "record", str(tmp_path / "out.trace"), "--model", str(model_dir))
    code, _, err = offload_here(monkeypatch, capfd, *args, "--prompt-file", str(tmp_path / "big.txt"))
    assert code == 2
    assert f"--prompt-file {tmp_path / 'big.txt'} is 10,000 bytes, more than the {LIMIT:,} bytes" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out.trace").exists()
