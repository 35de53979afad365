"""Every turn is autosaved to $OFFLOAD_HOME/chats; SIGTERM or a closed terminal loses nothing; --resume goes on."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pexpect
import pytest

from tests.test_chat_pty import PROMPT, slow_baby, spawn_chat  # noqa: F401  (slow_baby is a fixture)
from tests.test_cli_generate import offload_here


def chats() -> list[Path]:
    """The autosaved chats, oldest first."""
    return sorted(
        (Path(os.environ["OFFLOAD_HOME"]) / "chats").glob("*.json"), key=lambda path: path.stat().st_mtime_ns
    )


def messages(path: Path) -> list[dict[str, str]]:
    return json.loads(path.read_text())["messages"]


@pytest.mark.parametrize("ending", [signal.SIGTERM, signal.SIGHUP])
def test_a_killed_chat_resumes_with_every_turn(slow_baby: Path, ending: signal.Signals) -> None:  # noqa: F811
    child = spawn_chat(slow_baby, "--max-new-tokens", "400", "--temperature", "1", "--seed", "1")
    assert "offload chat --resume" in child.before
    child.sendline("First question")
    child.expect(r"tok/s · TTFT")
    child.expect_exact(PROMPT)
    (saved,) = chats()  # written after the turn, while the chat goes on
    assert [m["content"] for m in messages(saved)][:1] == ["First question"]
    child.sendline("Tell me a long story")
    child.expect("Tell me a long story\r\n")
    child.expect(r"\S{3}")  # the reply is streaming
    child.kill(ending)
    child.expect(pexpect.EOF)
    child.close()
    assert child.signalstatus == ending or child.exitstatus == 128 + ending
    turns = messages(saved)
    assert [m["content"] for m in turns[::2]] == ["First question", "Tell me a long story"]
    assert turns[3]["role"] == "assistant" and turns[3]["content"]  # the reply cut short is kept

    child = spawn_chat(slow_baby, "--max-new-tokens", "3", "--resume")
    assert "resumed 4 messages" in child.before
    child.sendline("Third")
    child.expect(r"tok/s · TTFT")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert chats() == [saved]  # the resumed chat goes on in its own file
    assert [m["content"] for m in messages(saved)[::2]] == ["First question", "Tell me a long story", "Third"]


def test_resume_by_name_and_with_nothing_saved(
    slow_baby: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    args = ["chat", "--model", str(slow_baby), "--dtype", "float32", "--max-new-tokens", "2"]
    code, _, err = offload_here(monkeypatch, capfd, *args, "--resume")
    assert code == 2 and "no saved chats in" in err and len(err.strip().splitlines()) == 1
    code, _, _ = offload_here(monkeypatch, capfd, *args, stdin=b"Hello\n/reset\nAgain\n")
    assert code == 0
    first, second = chats()  # /reset starts a new file; the cleared chat stays in its own
    assert [m["content"] for m in messages(first)[::2]] == ["Hello"]
    assert [m["content"] for m in messages(second)[::2]] == ["Again"]
    code, stdout, err = offload_here(monkeypatch, capfd, *args, "--resume", first.stem, stdin=b"More\n")
    assert code == 0, err
    assert "resumed 2 messages" in stdout
    assert [m["content"] for m in messages(first)[::2]] == ["Hello", "More"]
    code, _, err = offload_here(monkeypatch, capfd, *args, "--resume", "no-such-chat")
    assert code == 2 and "--resume no-such-chat: no such chat file" in err
