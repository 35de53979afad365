"""Edge inputs through the CLI: each has a clear behaviour or a clear one-line error.

| input | behaviour |
|---|---|
| ``generate ""`` | allowed: the chat template still gives ``<s>[INST]  [/INST]`` |
| ``generate --no-chat ""`` (or empty stdin) | allowed: the prompt is BOS alone |
| ``--max-new-tokens 0`` | prints nothing, exit 0; ``--json`` gives empty ``token_ids`` |
| ``--max-new-tokens -1`` | one-line error |
| stdin that is not UTF-8 (binary) | one-line error naming the byte |
| NUL bytes in UTF-8 text | allowed: NUL is text, the tokenizer encodes it |
| a 10,000-character word | allowed when its tokens fit the context, else the context error |
| a chat line that is not UTF-8 | the chat says so and goes on; NUL bytes are text there too |
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.soak import sentencepiece_model
from tests.fuzz_support import tiny_model
from tests.test_cli_generate import offload_here

LONG_WORD = "".join(chr(ord("a") + (i * 7) % 26) for i in range(10_000))  # no spaces, no repeats to merge


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small model with Mixtral's tokenizer, with a 512-token context and with a 16k one."""
    made = {}
    for name, context in (("short", 512), ("long", 16384)):
        directory = tiny_model(
            tmp_path_factory.mktemp(name), vocab_size=32000, hidden_size=16, max_position_embeddings=context
        )
        shutil.copy(sentencepiece_model(), directory / "tokenizer.model")
        made[name] = directory
    return made


def generate(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, model: Path, *args: str, stdin: bytes = b""
) -> tuple[int, str, str]:
    return offload_here(
        monkeypatch, capfd, "generate", "--model", str(model), "--temperature", "0", *args, stdin=stdin
    )


def one_line_error(code: int, stderr: str, message: str) -> None:
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "stdin", "prompt_ids"),
    [
        (["--no-chat", ""], b"", [1]),
        (["--no-chat", "-"], b"", [1]),
        (["", "--system", ""], b"", [1, 733, 16289, 28793, 28705, 733, 28748, 16289, 28793]),
    ],
    ids=["no-chat", "empty-stdin", "chat"],
)
def test_an_empty_prompt_is_allowed(
    models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
    args: list[str],
    stdin: bytes,
    prompt_ids: list[int],
) -> None:
    code, out, err = generate(
        monkeypatch, capfd, models["short"], "--max-new-tokens", "3", "--json", *args, stdin=stdin
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_ids"] == prompt_ids  # chat: "<s> ▁[INST] ▁ ▁[/INST]", as mistral-common encodes it
    assert 1 <= len(result["token_ids"]) <= 3


def test_max_new_tokens_zero_prints_nothing(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    code, out, err = generate(monkeypatch, capfd, models["short"], "--max-new-tokens", "0", "Hello")
    assert code == 0, err
    assert out.strip() == ""
    code, out, err = generate(monkeypatch, capfd, models["short"], "--max-new-tokens", "0", "--json", "Hello")
    assert code == 0, err
    result = json.loads(out)
    assert result["token_ids"] == [] and result["text"] == "" and result["finish_reason"] == "length"


def test_negative_max_new_tokens_is_one_line(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    code, _, err = generate(monkeypatch, capfd, models["short"], "--max-new-tokens", "-1", "Hello")
    one_line_error(code, err, "--max-new-tokens -1 is out of range: 0 to")


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (bytes(range(256)), "stdin is not valid UTF-8 text (byte 128)"),
        (b"\x00\x00\xff\x00", "stdin is not valid UTF-8 text (byte 2)"),
        (b"caf\xc3", "stdin is not valid UTF-8 text (byte 3)"),  # cut inside a character
    ],
    ids=["all-bytes", "nul-then-invalid", "truncated-character"],
)
def test_binary_stdin_is_one_line(
    models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
    stdin: bytes,
    message: str,
) -> None:
    code, _, err = generate(monkeypatch, capfd, models["short"], "-", stdin=stdin)
    one_line_error(code, err, message)


@pytest.mark.parametrize("stdin", [b"abc\x00def", b"\x00" * 8], ids=["inside-text", "only-nul"])
def test_nul_bytes_in_text_are_text(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, stdin: bytes
) -> None:
    code, out, err = generate(
        monkeypatch, capfd, models["short"], "--max-new-tokens", "2", "--json", "-", stdin=stdin
    )
    assert code == 0, err
    assert len(json.loads(out)["prompt_ids"]) > 9  # the template's ids plus the text's


def test_a_10000_character_word_fits_a_long_context(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    args = ("--no-chat", "--max-new-tokens", "2", "--json")
    code, out, err = generate(monkeypatch, capfd, models["long"], *args, LONG_WORD)
    assert code == 0, err
    result = json.loads(out)
    assert 512 < len(result["prompt_ids"]) < 16384 - 2  # many pieces and byte tokens, no crash
    assert len(result["token_ids"]) == 2


@pytest.mark.parametrize("source", ["argument", "stdin"])
def test_a_10000_character_word_past_a_short_context_is_one_line(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, source: str
) -> None:
    prompt, stdin = (LONG_WORD, b"") if source == "argument" else ("-", LONG_WORD.encode())
    code, _, err = generate(monkeypatch, capfd, models["short"], "--max-new-tokens", "2", prompt, stdin=stdin)
    # 10,000 bytes is past the 8,192 (16 per token) worth tokenizing for 512 tokens: refused untokenized.
    one_line_error(code, err, "model's context of 512 tokens")


def test_a_prompt_argument_that_is_not_utf8_is_one_line(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    argument = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python gives for Latin-1 bytes in argv
    code, _, err = generate(monkeypatch, capfd, models["short"], "--max-new-tokens", "2", argument)
    one_line_error(code, err, "UTF-8")


def test_chat_survives_lines_that_are_not_utf8_or_hold_nul(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """Piped (so no line editing touches the bytes) into a strict stdin, as under most UTF-8 locales
    (C.UTF-8 gives surrogateescape): the chat must not die in input() nor in the tokenizer."""
    saved = tmp_path / "chat.json"
    lines = [b"caf\xe9 au lait", b"abc\x00def", f"/save {saved}".encode()]
    code, out, err = offload_here(
        monkeypatch, capfd, "chat", "--model", str(models["short"]), "--max-new-tokens", "3",
        stdin=b"\n".join(lines) + b"\n",
    )  # fmt: skip
    assert code == 0, err
    assert "Traceback" not in err
    assert out.count("not valid UTF-8 text; type it again") == 1
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]  # the bad line was never sent
    assert messages[0]["content"] == "abc\x00def"
