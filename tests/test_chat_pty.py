"""The real `offload chat` in a pseudo-terminal, as a user drives it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pexpect
import pytest

from tests.baby import BabySpec, write_baby
from tests.test_cli_generate import sentencepiece_v1

PROMPT = ">>> "


@pytest.fixture(scope="module")
def slow_baby(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A baby with the real tokenizer; wide enough that a 400-token reply takes a while to stream."""
    directory = tmp_path_factory.mktemp("pty-baby")
    write_baby(BabySpec("pty-baby", hidden_size=64, intermediate_size=96, vocab_size=32000), directory)
    shutil.copy(sentencepiece_v1(), directory / "tokenizer.model")
    return directory


def spawn_chat(model: Path, *extra: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        [
            "-c",
            "from cli.main import run; run()",
            "chat",
            "--model",
            str(model),
            "--dtype",
            "float32",
            *extra,
        ],
        encoding="utf-8",
        timeout=90,
        dimensions=(40, 200),
    )
    child.expect_exact(PROMPT)
    return child


def test_chat_session_in_a_terminal(slow_baby: Path, tmp_path: Path) -> None:
    child = spawn_chat(slow_baby, "--max-new-tokens", "6", "--temperature", "0")
    child.sendline("Hello there")
    child.expect(r"tok/s · TTFT")
    child.expect_exact(PROMPT)
    child.sendline("And a second turn")
    child.expect(r"tok/s · TTFT")
    child.expect_exact(PROMPT)
    child.sendline("/stats")
    child.expect("offload stats")
    child.expect("last reply: .* tok/s decode")  # the speed /help promises
    child.expect_exact(PROMPT)

    saved = tmp_path / "chat.json"
    child.sendline(f"/save {saved}")
    child.expect("saved to")
    child.expect_exact(PROMPT)
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "And a second turn"

    child.sendline("/reset")
    child.expect("conversation cleared")
    child.expect_exact(PROMPT)
    child.sendline(f"/load {saved}")
    child.expect("loaded 4 messages")
    child.expect_exact(PROMPT)
    child.sendline("/save " + str(tmp_path / "again.json"))
    child.expect_exact(PROMPT)
    assert json.loads((tmp_path / "again.json").read_text())["messages"] == messages

    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_reply_and_keeps_the_chat(slow_baby: Path, tmp_path: Path) -> None:
    child = spawn_chat(slow_baby, "--max-new-tokens", "400", "--temperature", "1", "--seed", "1")
    child.sendline("Tell me a long story")
    child.expect("Tell me a long story\r\n")  # the echo of the line
    child.expect(r"\S{3}")  # the reply has started streaming
    child.sendintr()
    child.expect("reply stopped")
    child.expect_exact(PROMPT)
    child.sendintr()  # Ctrl-C at the prompt does not exit
    child.expect("Ctrl-D or /exit quits")
    child.expect_exact(PROMPT)
    saved = tmp_path / "after.json"
    child.sendline(f"/save {saved}")
    child.expect_exact(PROMPT)
    messages = json.loads(saved.read_text())["messages"]
    assert messages[0]["content"] == "Tell me a long story"
    assert messages[1]["role"] == "assistant"
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
