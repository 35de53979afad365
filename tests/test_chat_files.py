"""Chat files: /save and /load fail with one clear line, never an exception that ends the chat."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from offload.chat import ChatSession, read_chat_save
from offload.errors import OffloadError


def conversation() -> SimpleNamespace:
    """What ChatSession.save reads from a session."""
    return SimpleNamespace(system=None, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])  # fmt: skip


def unwritable(tmp_path: Path) -> dict[str, Path]:
    regular = tmp_path / "regular.txt"
    regular.write_text("a file, not a directory")
    return {
        "a directory": tmp_path,
        "under a regular file": regular / "chat.json",
        "/proc/version": Path("/proc/version"),
        "a NUL byte": tmp_path / "a\0b.json",
    }


@pytest.mark.parametrize("case", ["a directory", "under a regular file", "/proc/version", "a NUL byte"])
def test_save_to_an_unwritable_place_is_one_offload_error(tmp_path: Path, case: str) -> None:
    path = unwritable(tmp_path)[case]
    with pytest.raises(OffloadError, match="cannot write the chat there") as raised:
        ChatSession.save(conversation(), path)
    assert "\n" not in str(raised.value)


def test_save_to_a_read_only_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, which writes anywhere; the OS's refusal is imitated instead.
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(OffloadError, match="Permission denied"):
        ChatSession.save(conversation(), tmp_path / "chat.json")


def test_load_of_a_directory_or_unknown_home(tmp_path: Path) -> None:
    with pytest.raises(OffloadError, match="is a directory"):
        read_chat_save(tmp_path)
    with pytest.raises(OffloadError, match="home directory"):
        ChatSession.load(conversation(), "~no-such-user-h3/chat.json")
