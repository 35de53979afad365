"""Every chat is written to ``$OFFLOAD_HOME/chats/`` after each turn, so no way of ending it loses the conversation.

A conversation gets a file of its own, named by when it started (``20261201-154500-PID.json``, the format
``/save`` writes), and the whole file is replaced atomically after every turn. ``offload chat --resume``
loads the latest one and goes on writing to it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from offload.errors import OffloadError
from offload.settings.profile import offload_home

CHATS = "chats"


def chats_dir() -> Path:
    """Where chats are autosaved: ``$OFFLOAD_HOME/chats``."""
    return offload_home() / CHATS


class Autosave:
    """The file this conversation is written to after every turn."""

    def __init__(self, directory: Path, path: Path | None = None) -> None:
        self.directory = directory
        self.path = path if path is not None else self._new_path()

    def save(self, session) -> None:
        """Write ``session`` (a ChatSession) to this chat's file; nothing while it has no turn yet."""
        if session.messages:
            session.save(self.path)

    def start_new(self) -> None:
        """A new conversation (after /reset or /load) gets a file of its own; the old file stays."""
        self.path = self._new_path()

    def _new_path(self) -> Path:
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        path, count = self.directory / f"{stem}.json", 1
        while path.exists():  # a second conversation started within the same second
            count += 1
            path = self.directory / f"{stem}-{count}.json"
        return path


def find_saved_chat(name: str | None, directory: Path) -> Path:
    """The chat ``--resume NAME`` means: a path, a file in ``directory`` (with or without .json), or the latest."""
    if name is None:
        saved = _saved_chats(directory)
        if not saved:
            raise OffloadError(
                f"no saved chats in {directory} yet; every chat is saved there after each turn"
            )
        return saved[-1]
    for candidate in (Path(name).expanduser(), directory / name, directory / f"{name}.json"):
        if candidate.is_file():
            return candidate
    raise OffloadError(
        f"--resume {name}: no such chat file, and none of that name in {directory} "
        "(`offload chat --resume` takes the latest)"
    )


def _saved_chats(directory: Path) -> list[Path]:
    """The chats in ``directory``, oldest first by the time they were last written."""
    try:
        found = [
            (path.stat().st_mtime_ns, path.name, path) for path in directory.glob("*.json") if path.is_file()
        ]
    except OSError:
        return []
    return [path for *_, path in sorted(found)]
