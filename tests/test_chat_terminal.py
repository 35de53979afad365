"""`offload chat` in a pseudo-terminal: files, the transcript, autosave and the chat commands."""

from __future__ import annotations

import json
from pathlib import Path

import pexpect

from tests.test_chat_pty import PROMPT, slow_baby, spawn_chat  # noqa: F401  (slow_baby is a fixture)


def test_save_failures_keep_the_chat_going(slow_baby: Path, tmp_path: Path) -> None:  # noqa: F811
    regular = tmp_path / "regular.txt"
    regular.write_text("mine")
    child = spawn_chat(slow_baby, "--max-new-tokens", "3", "--temperature", "0")
    child.sendline("Hello")
    child.expect(r"tok/s · TTFT")
    child.expect_exact(PROMPT)
    # /save! goes past the question about replacing an existing file, to the write itself.
    for place in (tmp_path, regular / "chat.json", "/proc/version"):
        child.sendline(f"/save! {place}")
        child.expect("error:.*(cannot write the chat there|is a directory)")
        child.expect_exact(PROMPT)
    saved = tmp_path / "chat.json"
    child.sendline(f"/save {saved}")
    child.expect("saved to")
    child.expect_exact(PROMPT)
    assert json.loads(saved.read_text())["messages"][0]["content"] == "Hello"
    assert regular.read_text() == "mine"
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
