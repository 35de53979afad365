"""Written files: never a silent replacement of an existing file, and the user's umask, not owner-only."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pexpect
import pytest

from offload.atomic import write_bytes_atomically
from tests.test_chat_pty import PROMPT, slow_baby, spawn_chat  # noqa: F401  (slow_baby is a fixture)
from tests.test_cli_generate import offload_here


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_keep_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        write_bytes_atomically(tmp_path / "file.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "file.json").stat().st_mode) == mode


def test_trace_record_refuses_an_existing_file(
    slow_baby: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("100 KB of notes")
    args = [
        "trace",
        "record",
        str(out),
        "--model",
        str(slow_baby),
        "--max-new-tokens",
        "2",
        "--dtype",
        "float32",
    ]
    code, _, err = offload_here(monkeypatch, capfd, *args)
    assert code == 2 and f"{out} exists; pass --force to replace it" in err
    assert out.read_text() == "100 KB of notes"
    code, _, err = offload_here(
        monkeypatch, capfd, "trace", "record", str(tmp_path), "--model", str(slow_baby)
    )
    assert code == 2 and "is a directory" in err
    old = os.umask(0o022)
    try:
        code, stdout, err = offload_here(monkeypatch, capfd, *args, "--force")
    finally:
        os.umask(old)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_chat_save_refuses_an_existing_file_without_a_terminal(
    slow_baby: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    forced = tmp_path / "forced.json"
    forced.write_text("old")
    lines = f"Hi\n/save {existing}\n/save! {forced}\n".encode()
    args = ["chat", "--model", str(slow_baby), "--dtype", "float32", "--max-new-tokens", "2"]
    code, stdout, _ = offload_here(monkeypatch, capfd, *args, stdin=lines)
    assert code == 0
    assert f"{existing} exists; /save! {existing} to replace it" in stdout.replace("\n", "")
    assert existing.read_text() == "mine"
    assert json.loads(forced.read_text())["messages"][0]["content"] == "Hi"


def test_chat_save_asks_on_a_terminal(slow_baby: Path, tmp_path: Path) -> None:  # noqa: F811
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    child = spawn_chat(slow_baby, "--max-new-tokens", "2", "--temperature", "0")
    child.sendline("Hi")
    child.expect_exact(PROMPT)
    child.sendline(f"/save {existing}")
    child.expect_exact("exists (4 bytes); replace it? [y/N] ")
    child.sendline("n")
    child.expect("left as it is")
    child.expect_exact(PROMPT)
    assert existing.read_text() == "mine"
    child.sendline(f"/save {existing}")
    child.expect_exact("replace it? [y/N] ")
    child.sendline("y")
    child.expect("saved to")
    child.expect_exact(PROMPT)
    assert json.loads(existing.read_text())["messages"][0]["content"] == "Hi"
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_trace_record_asks_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    import io
    import sys

    from cli.main import run
    from tests.test_convert import _Terminal

    out = tmp_path / "notes.txt"
    out.write_text("mine")
    monkeypatch.setattr(sys, "argv", ["offload", "trace", "record", str(out)])
    monkeypatch.setattr(sys, "stdin", _Terminal(io.BytesIO(b"n\n")))
    with pytest.raises(SystemExit) as exited:
        run()
    _, err = capfd.readouterr()
    assert f"{out} exists (4 bytes); replace it? [y/N]" in err
    assert exited.value.code == 2 and "was left as it is" in err
    assert out.read_text() == "mine"
